"""Structured outputs and logit_bias in the engine: constrained, biased and free requests share a step and the free
ones get exactly the tokens they get alone; the bitmask llguidance fills is the one it computes; a grammar that
completes ends its request with `stop` (no eos needed), one cut by max_new_tokens with `length`; a grammar that fails
or a token it refuses fails that request alone; grammars compile once, errors name the field."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest
import torch

from gateway import Engine
from gateway.model.sampling import apply_logit_bias, mask_tokens
from gateway.serving.constraints import GrammarCompiler, StructuredOutput, fill_bitmask, unpack_bitmask
from gateway.serving.sampling_params import SamplingParams
from model_core.tokenizer import ByteTokenizer
from tests.conftest import random_prompts

MODEL = "tiny-v3"
VOCAB = 272
TOK = ByteTokenizer.default()
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "bb"]}, "ok": {"type": "boolean"}},
          "required": ["id", "tag", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(model_dirs):
    with Engine.from_pretrained(model_dirs[MODEL]) as e:
        yield e


def text_of(tokens: list[int]) -> str:
    return TOK.decode(tokens)


def run(engine: Engine, requests: list) -> list[int]:
    """Step until every request is done; the batch size of each step."""
    sizes = []
    while not all(r.done for r in requests):
        engine.step()
        sizes.append(engine.last_batch_size)
    return sizes


def test_free_requests_sharing_steps_with_constrained_and_biased_ones_get_their_tokens_alone(engine):
    free = random_prompts(VOCAB, [5, 9, 6], seed=70)
    alone = [engine.generate([p], max_new_tokens=12, stop_at_eos=False)[0] for p in free]
    json_out = StructuredOutput.json_schema(SCHEMA, "schema")
    constrained = [engine.submit(p, max_new_tokens=40, structured=json_out) for p in random_prompts(VOCAB, [4, 7], 71)]
    biased = engine.submit(free[0], max_new_tokens=12, stop_at_eos=False, logit_bias={alone[0][0]: -100})
    shared = [engine.submit(p, max_new_tokens=12, stop_at_eos=False) for p in free]
    sizes = run(engine, constrained + [biased] + shared)
    assert sizes[0] == 6 and max(sizes) == 6  # all six in one step from the first
    assert [r.output for r in shared] == alone
    for r in constrained:
        assert r.finish_reason == "stop", text_of(r.output)
        jsonschema.validate(json.loads(text_of(r.output)), SCHEMA)
    assert alone[0][0] not in biased.output


def test_free_rows_sample_the_same_with_and_without_constrained_and_biased_neighbours(engine):
    """ModelRunner.sample alone, on fixed logits: a free row's token (greedy and seeded) does not depend on the
    other rows' bias and masks."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    regex = StructuredOutput("regex", "[0-9]+", "guided_regex")

    def rows(with_neighbours: bool) -> list[int | None]:
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=4)]
        if with_neighbours:
            params += [SamplingParams(temperature=1.0, seed=5, structured=regex),
                       SamplingParams(temperature=0.0, logit_bias={int(logits[3].argmax()): -100})]
        requests = [p.request(f"r{i}", [5, 6], 1, torch.device("cpu"), vocab_size=VOCAB,
                              grammars=engine.runner.grammars) for i, p in enumerate(params)]
        return engine.runner.sample(requests, logits[: len(requests)])

    alone, together = rows(False), rows(True)
    assert together[:2] == alone
    assert chr(together[2] - 3).isdigit() and together[3] != int(logits[3].argmax())


def test_logit_bias_and_the_mask_are_added_then_applied_as_written():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    biased = apply_logit_bias(logits, torch.tensor([0, 3]), torch.tensor([100.0, -100.0]))
    assert torch.equal(biased, torch.tensor([101.0, 2.0, 3.0, -96.0]))
    masked = mask_tokens(biased, torch.tensor([False, True, True, False]))
    assert torch.equal(masked, torch.tensor([float("-inf"), 2.0, 3.0, float("-inf")]))
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # inputs untouched


def test_the_bitmask_filled_for_a_batch_is_what_llguidance_computes_and_what_the_grammar_accepts(engine):
    grammars = engine.runner.grammars
    options = [StructuredOutput.json_schema(SCHEMA, "s"), StructuredOutput("regex", "[a-c]{2}x?", "r"),
               StructuredOutput.choice(["yes", "no"], "c")]
    constraints = [grammars.constraint(o) for o in options]
    for c, prefix in zip(constraints, ['{"id":', "ab", "y"], strict=True):
        for t in TOK.encode(prefix, add_bos=False):
            assert c.advance(t) is None
    bits = fill_bitmask(constraints, VOCAB)
    allowed = unpack_bitmask(bits, VOCAB, torch.device("cpu"))  # [3, V]
    assert allowed.shape == (3, VOCAB)
    for row, c in enumerate(constraints):
        own = torch.frombuffer(bytearray(c.matcher.compute_bitmask()), dtype=torch.int32)
        assert torch.equal(bits[row], own)
        want = [t for t in range(VOCAB) if c.matcher.validate_tokens([t]) == 1]
        assert allowed[row].nonzero().flatten().tolist() == want
    assert allowed[0].nonzero().flatten().tolist() == [t + 3 for t in b"0123456789"]  # an integer starts
    assert set(allowed[1].nonzero().flatten().tolist()) == {ord("x") + 3, 1}  # 'x' or eos (the regex is complete)
    assert allowed[2].nonzero().flatten().tolist() == [ord("e") + 3]


def test_a_complete_grammar_ends_its_request_with_stop_without_an_eos_and_a_cut_one_with_length(engine):
    prompt = random_prompts(VOCAB, [6], seed=72)[0]
    choice = engine.submit(prompt, max_new_tokens=20, structured=StructuredOutput.choice(["maybe", "no"], "c"))
    cut = engine.submit(prompt, max_new_tokens=4, structured=StructuredOutput.json_schema(SCHEMA, "s"))
    run(engine, [choice, cut])
    assert choice.finish_reason == "stop" and text_of(choice.output) in ("maybe", "no") and 1 not in choice.output
    assert cut.finish_reason == "length" and text_of(cut.output) == '{"id' and cut.error is None
    got = engine.generate([prompt], max_new_tokens=8, structured=StructuredOutput("regex", "[0-9]{3}", "r"))[0]
    assert len(got) == 3 and text_of(got).isdigit()


def test_a_failed_grammar_or_a_refused_token_fails_that_request_alone(engine, monkeypatch):
    free_prompt = random_prompts(VOCAB, [5], seed=73)[0]
    alone = engine.generate([free_prompt], max_new_tokens=6, stop_at_eos=False)[0]
    regex = StructuredOutput("regex", "[0-9]{8}", "guided_regex")
    broken = engine.submit([5, 6, 7], max_new_tokens=6, structured=regex)
    free = engine.submit(free_prompt, max_new_tokens=6, stop_at_eos=False)
    engine.step()
    broken.constraint.matcher.consume_token(ord("z") + 3)  # the matcher enters its error state
    run(engine, [broken, free])
    assert broken.finish_reason == "error" and "guided_regex: the grammar failed" in broken.error
    assert free.output == alone

    # Without the mask (a bug), greedy samples a token the grammar refuses: that request fails, naming it.
    monkeypatch.setattr("gateway.serving.model_runner.mask_tokens", lambda logits, allowed: logits)
    letters = StructuredOutput("regex", "q+", "structured_outputs.regex")
    refused = engine.submit([5, 6, 7], max_new_tokens=6, structured=letters)
    free = engine.submit(free_prompt, max_new_tokens=6, stop_at_eos=False)
    run(engine, [refused, free])
    assert refused.finish_reason == "error" and "structured_outputs.regex: sampled token" in refused.error
    assert "rejected by the grammar" in refused.error and free.output == alone


def test_grammars_compile_once_and_errors_name_the_field(engine, tmp_path):
    grammars = GrammarCompiler(engine.config.model, VOCAB, 1)
    option = StructuredOutput.json_schema(SCHEMA, "response_format.json_schema.schema")
    first, second = grammars.constraint(option), grammars.constraint(option)
    assert len(grammars._compiled) == 1 and first.matcher is not second.matcher  # one compile, a copy each
    for bad, words in ((StructuredOutput.json_schema({"type": "foo"}, "guided_json"), ["guided_json", "foo"]),
                       (StructuredOutput("regex", "(", "guided_regex"), ["guided_regex"]),
                       (StructuredOutput("grammar", "start: nope", "guided_grammar"), ["guided_grammar", "nope"])):
        with pytest.raises(ValueError) as caught:
            grammars.constraint(bad)
        assert all(w in str(caught.value) for w in words), str(caught.value)
    with pytest.raises(ValueError, match="guided_regex: structured outputs need the model's tokenizer.json"):
        GrammarCompiler(tmp_path, VOCAB, 1).constraint(StructuredOutput("regex", "a", "guided_regex"))
    with pytest.raises(ValueError, match="guided_choice.1: expected a non-empty string"):
        StructuredOutput.choice(["a", 3], "guided_choice")
    with pytest.raises(ValueError, match="guided_json: not valid JSON"):
        StructuredOutput.json_schema("{", "guided_json")
    assert isinstance(llguidance.LLMatcher(grammars.tokenizer("x"), option.grammar()), llguidance.LLMatcher)


@pytest.mark.parametrize("bias, words", [
    ({"12": 101}, "logit_bias.12: 101"), ({"-1": 1}, "logit_bias.-1: expected a token id"),
    ({"1.5": 1}, "logit_bias.1.5"), ({"7": float("nan")}, "logit_bias.7"), ({"7": True}, "logit_bias.7"),
    ({7: 1, "7": 2}, "logit_bias.7: token 7 given twice"), ([1, 2], "expected a map"),
])
def test_logit_bias_entries_are_checked_by_name(bias, words):
    with pytest.raises(ValueError) as caught:
        SamplingParams(logit_bias=bias)
    assert words in str(caught.value)


def test_logit_bias_ids_are_checked_against_the_vocabulary_and_kept_sorted(engine):
    params = SamplingParams(logit_bias={"9": -1.5, 3: 100})
    assert params.logit_bias == ((3, 100.0), (9, -1.5))
    assert SamplingParams.of(params, seed=1).logit_bias == params.logit_bias
    with pytest.raises(ValueError, match=r"logit_bias.272: token id outside \[0, vocab_size=272\)"):
        engine.submit([5, 6], max_new_tokens=2, logit_bias={272: 1.0})
    request = params.request("r", [5], 1, torch.device("cpu"), vocab_size=VOCAB)
    assert request.logit_bias[0].tolist() == [3, 9] and request.logit_bias[1].tolist() == [100.0, -1.5]
