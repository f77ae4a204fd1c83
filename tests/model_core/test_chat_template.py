"""Chat templates render as transformers' apply_chat_template renders them, from either place a checkpoint keeps
them; the byte tokenizer reads special tokens in text as those tokens."""

from __future__ import annotations

import json

import pytest

from model_core.chat_template import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError
from model_core.tokenizer import ByteTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? ✓"},
            {"role": "assistant", "content": "Gut."}, {"role": "user", "content": "Und dann?"}]


def test_make_models_template_renders_and_tokenizes_as_transformers_does(model_dirs):
    from transformers import PreTrainedTokenizerFast

    path = model_dirs["tiny-v3"]
    ours = ChatTemplate.from_dir(path)
    assert ours is not None and ours.source == DEFAULT_TEMPLATE
    theirs = PreTrainedTokenizerFast.from_pretrained(str(path))
    for generation_prompt in (True, False):
        text = ours.render(MESSAGES, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    ids = ByteTokenizer.from_dir(path).encode(ours.render(MESSAGES), add_bos=False)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    assert ids == list(getattr(expected, "input_ids", expected))
    assert ids[0] == 0 and ids.count(1) == 1  # bos once at the start; eos closes the assistant's turn


def test_templates_are_found_where_checkpoints_keep_them(tmp_path):
    assert ChatTemplate.from_dir(tmp_path) is None  # none: chat is refused by name upstream
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "<s>D"  # AddedToken dicts and named templates
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}{{ eos_token }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "Jx</s>"  # file first


def test_template_refusals_and_syntax_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="role function"):
        ChatTemplate(DEFAULT_TEMPLATE).render([{"role": "function", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="chat_template"):
        ChatTemplate("{{ messages.nope.deeper }}").render([])


def test_byte_tokenizer_reads_special_tokens_in_text():
    tok = ByteTokenizer.default()
    assert tok.encode("a<|eos|>b", add_bos=False) == [tok.byte_ids[97], tok.eos_id, tok.byte_ids[98]]
    assert tok.encode("<|bos|><|pad|>", add_bos=False) == [tok.bos_id, tok.specials["<|pad|>"]]
    assert tok.decode(tok.encode("plain <|eos text", add_bos=False)) == "plain <|eos text"


def test_an_unusable_tokenizer_config_is_a_chat_template_error_naming_it(tmp_path):
    file = tmp_path / "tokenizer_config.json"
    for content, why in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")):
        file.write_text(content)
        with pytest.raises(ChatTemplateError, match=f"{file}: {why}"):
            ChatTemplate.from_dir(tmp_path)
