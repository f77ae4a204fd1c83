"""Tool calls in DeepSeek-V3's format: the streaming parser finds what the whole-text parser finds however the text is
cut (content around the calls, several calls, arguments with braces, quotes, backticks and unicode; malformed and cut
texts too), auto mode returns a malformed call as content, and the forcing grammar (llguidance, on the generated
byte tokenizer and on one whose markers are special tokens) accepts exactly the calls it should."""

from __future__ import annotations

import json

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.serving.tool_calls import (
    MarkerDecoder,
    ParsedMessage,
    ToolCall,
    ToolCallStream,
    hidden_marker_ids,
    parse_tool_calls,
    tool_call_grammar,
)
from model_core.chat_template import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_MARKERS,
    TOOL_SEP,
)
from model_core.tokenizer import SPECIAL_TOKENS, ByteTokenizer

NAMES = ("get_weather", "lookup-2", "f")
VOCAB = 272  # the generated models' vocabulary: 3 specials, 256 bytes, 13 spare ids


def call_id(i: int) -> str:
    return f"call_x_{i}"


def call_text(name: str, arguments: str) -> str:
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"


def section(calls: list[tuple[str, str]]) -> str:
    return TOOL_CALLS_BEGIN + "\n".join(call_text(n, a) for n, a in calls) + TOOL_CALLS_END


def streamed(text: str, cuts: list[int], stream_arguments: bool) -> ParsedMessage:
    """What a client reassembles from the deltas of `text` streamed in the pieces `cuts` make."""
    bounds = [0, *sorted(cuts), len(text)]
    parser = ToolCallStream(NAMES, stream_arguments, call_id)
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)] + [parser.finish()]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for entry in delta.tool_calls:
            call = calls.setdefault(entry["index"], {"arguments": ""})
            if "id" in entry:
                assert "id" not in call and entry["type"] == "function", entry  # the header comes once, first
                call.update(id=entry["id"], name=entry["function"]["name"])
            assert "id" in call, entry
            call["arguments"] += entry["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    assert parser.calls == len(calls)
    return ParsedMessage("".join(d.content for d in deltas),
                         [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())])


# Argument values: braces, quotes, backslashes, backticks (a fence inside a string), markers' characters, unicode.
VALUES = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(),
                   st.text(alphabet=st.sampled_from(list('{}[]"\\`\n<>｜▁ aé漢😀')) | st.characters(), max_size=12))
ARGUMENTS = st.dictionaries(st.text(max_size=6), st.one_of(VALUES, st.lists(VALUES, max_size=3)), max_size=4).map(
    lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")))
CONTENT = st.lists(st.sampled_from([*'ab \n<｜▁`{}"é', "<｜tool", "<｜tool▁calls▁beg"]), max_size=12).map("".join)
CALL = st.tuples(st.sampled_from(NAMES), ARGUMENTS)


@st.composite
def tool_texts(draw) -> tuple[str, str, list[tuple[str, str]], str]:
    """(the text, the content before, the calls, the content after) of a well-formed answer."""
    before, calls, after = draw(CONTENT), draw(st.lists(CALL, max_size=4)), draw(CONTENT)
    return before + (section(calls) if calls else "") + after, before, calls, after


def mutated(text: str, data: st.DataObject) -> str:
    """The text cut short, with a piece removed, or with a piece inserted (a malformed answer, mostly)."""
    how = data.draw(st.sampled_from(["cut", "drop", "insert", "keep"]))
    at = data.draw(st.integers(0, len(text)))
    if how == "cut":
        return text[:at]
    if how == "drop":
        return text[:at] + text[at + data.draw(st.integers(1, 30)):]
    if how == "insert":
        return text[:at] + data.draw(st.sampled_from(["x", "\n", "}", "nope", TOOL_CALL_END, "```"])) + text[at:]
    return text


@settings(max_examples=300, deadline=None, derandomize=True, database=None, print_blob=False)
@given(tool_texts(), st.data())
def test_every_split_of_a_stream_parses_to_the_whole_texts_calls(drawn, data):
    text, before, calls, after = drawn
    for stream_arguments in (True, False):
        whole = parse_tool_calls(text, NAMES, stream_arguments, call_id)
        # well-formed: the calls as written, the text around them as content
        assert whole == ParsedMessage(before + after, [ToolCall(call_id(i), n, a) for i, (n, a) in enumerate(calls)])
        cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
        assert streamed(text, cuts, stream_arguments) == whole
        assert streamed(text, list(range(len(text) + 1)), stream_arguments) == whole  # a character at a time
        broken = mutated(text, data)  # malformed or cut texts stream to the same answer too
        cuts = data.draw(st.lists(st.integers(0, len(broken)), max_size=12))
        assert streamed(broken, cuts, stream_arguments) == parse_tool_calls(broken, NAMES, stream_arguments, call_id)


def test_auto_returns_a_malformed_call_as_content_and_keeps_the_calls_before_it():
    good, bad = call_text("f", '{"a":1}'), call_text("f", '{"a":')
    for text, want_calls, content in [
        (f"Hi{TOOL_CALLS_BEGIN}{good}\n{bad}{TOOL_CALLS_END}", 1, f"Hi\n{bad}{TOOL_CALLS_END}"),  # bad JSON
        (f"Hi{TOOL_CALLS_BEGIN}{bad}{TOOL_CALLS_END}", 0, f"Hi{TOOL_CALLS_BEGIN}{bad}{TOOL_CALLS_END}"),
        (f"{TOOL_CALLS_BEGIN}{call_text('unknown', '{}')}{TOOL_CALLS_END}", 0, None),  # not a tool of the request
        (f"{TOOL_CALLS_BEGIN}{call_text('f', '[1]')}{TOOL_CALLS_END}", 0, None),  # arguments not an object
        (f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}code{TOOL_SEP}f\n```json\n{{}}\n```{TOOL_CALL_END}", 0, None),
        (f"{TOOL_CALLS_BEGIN}{good}", 1, ""),  # the section never closed: the call stands
        (f"{TOOL_CALLS_BEGIN}{good[:-5]}", 0, None),  # cut inside the call
        (f"{TOOL_CALLS_BEGIN}{good} junk", 1, " junk"),
    ]:
        parsed = parse_tool_calls(text, NAMES, stream_arguments=False, call_id=call_id)
        assert len(parsed.calls) == want_calls and parsed.content == (text if content is None else content), text
        assert all(json.loads(c.arguments) == {"a": 1} for c in parsed.calls)


def test_a_forced_call_cut_short_keeps_its_partial_arguments_and_text_without_markers_is_content():
    text = TOOL_CALLS_BEGIN + call_text("get_weather", '{"city":"Pa')[: -len("\n```" + TOOL_CALL_END)]
    parsed = parse_tool_calls(text, NAMES, stream_arguments=True, call_id=call_id)
    assert parsed == ParsedMessage("", [ToolCall("call_x_0", "get_weather", '{"city":"Pa')])
    plain = "no call here <｜tool▁calls▁beg"
    assert parse_tool_calls(plain, NAMES, True, call_id) == ParsedMessage(plain, [])
    parser = ToolCallStream(NAMES, True, call_id)
    assert parser.feed(plain).content == "no call here "  # the start of a marker is held back...
    assert parser.finish().content == "<｜tool▁calls▁beg"  # ...until the text ends


def test_a_forced_call_streams_its_header_once_then_argument_fragments():
    parser = ToolCallStream(NAMES, True, call_id)
    text = section([("f", '{"q":"a`b"}')])
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    entries = [e for p in pieces for e in parser.feed(p).tool_calls] + parser.finish().tool_calls
    first = entries[0]  # its arguments: what the same piece carried after the header
    assert (first["index"], first["id"], first["type"], first["function"]["name"]) == (0, "call_x_0", "function", "f")
    assert len(entries) > 2 and all(set(e) == {"index", "function"} for e in entries[1:])
    assert "".join(e["function"]["arguments"] for e in entries) == '{"q":"a`b"}'


def llg_tokenizer(tokenizer: ByteTokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(json.dumps(tokenizer.to_json()), n_vocab=VOCAB, eos_token=tokenizer.eos_id)


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer"}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = {"get_weather": SCHEMA, "f": None}


def accepts(grammar: str, tokenizer: llguidance.LLTokenizer, tokens: list[int]) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


def test_the_grammar_on_plain_text_markers_takes_valid_calls_only_and_one_without_parallel():
    tok = ByteTokenizer.default()
    llg = llg_tokenizer(tok)
    one = section([("get_weather", '{"city":"Paris","days":3}')])
    two = section([("get_weather", '{"city":"Paris","days":3}'), ("f", "{}")])
    parallel, single = tool_call_grammar(TOOLS, True, {}), tool_call_grammar(TOOLS, False, {})
    assert accepts(parallel, llg, tok.encode(one, add_bos=False))
    assert accepts(parallel, llg, tok.encode(two, add_bos=False))
    assert accepts(single, llg, tok.encode(one, add_bos=False))
    assert not accepts(single, llg, tok.encode(two, add_bos=False))
    for wrong in ('{"city":"Paris"}', '{"city":"Paris","days":3,"x":1}', '{"city": "Paris","days":3}',
                  '{"city":"Paris!!","days":3}'):  # a missing, an extra key; free whitespace; too long a string
        assert not accepts(parallel, llg, tok.encode(section([("get_weather", wrong)]), add_bos=False)), wrong
    assert not accepts(tool_call_grammar({"f": None}, True, {}), llg, tok.encode(one, add_bos=False))  # named: f


def test_markers_that_are_special_tokens_are_matched_by_id_and_kept_when_decoding():
    # A tokenizer shaped like a DeepSeek checkpoint's: each marker is one special token (ids 259.., spare ids of the
    # generated vocabulary), which decode drops.
    specials = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {m: 259 + i for i, m in enumerate(TOOL_MARKERS)}
    tok = ByteTokenizer({b: len(SPECIAL_TOKENS) + b for b in range(256)}, specials)
    markers = hidden_marker_ids(tok)
    assert markers == {m: 259 + i for i, m in enumerate(TOOL_MARKERS)}
    assert hidden_marker_ids(ByteTokenizer.default()) == {}  # the generated tokenizer: plain text
    text = "ok" + section([("get_weather", '{"city":"Nice","days":1}')])
    ids = tok.encode(text, add_bos=False)
    assert ids.count(markers[TOOL_CALLS_BEGIN]) == 1 and TOOL_CALLS_BEGIN not in tok.decode(ids)
    assert MarkerDecoder(tok, markers).decode(ids) == text
    grammar = tool_call_grammar(TOOLS, True, markers)
    assert "<[259]>" in grammar and TOOL_CALLS_BEGIN not in grammar
    llg = llg_tokenizer(tok)
    assert accepts(grammar, llg, tok.encode(section([("get_weather", '{"city":"Nice","days":1}')]), add_bos=False))
    as_bytes = [tok.byte_ids[b] for b in TOOL_CALLS_BEGIN.encode()]  # the marker's text, byte by byte: refused
    matcher = llguidance.LLMatcher(llg, grammar, log_level=0)
    assert not matcher.consume_tokens(as_bytes[:1])


@pytest.mark.parametrize("stream_arguments", [True, False])
def test_text_after_the_calls_is_content_and_a_second_section_is_parsed_too(stream_arguments):
    text = "a" + section([("f", "{}")]) + "b" + section([("f", '{"k":[]}')]) + "c"
    parsed = parse_tool_calls(text, NAMES, stream_arguments, call_id)
    assert parsed.content == "abc" and [c.arguments for c in parsed.calls] == ["{}", '{"k":[]}']
    assert [c.id for c in parsed.calls] == ["call_x_0", "call_x_1"]
