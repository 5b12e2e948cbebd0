"""Tool-call and reasoning parsers: whole answers against hand-written expectations, and the
streaming readers fed the same answers cut at every character boundary and at every token
boundary of the embedded tokenizer (where `>` merges with the next character, and a tag
spans tokens): the assembled reasoning, content and calls equal the whole-answer parse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent_fixtures import HERMES_ANSWERS, HERMES_TEMPLATE, QWEN3_CODER_ANSWERS, \
    QWEN3_CODER_TEMPLATE, WEATHER_TOOLS
from plt_port.app.assistant_output import Answer, AnswerReader
from plt_port.app.tool_parsers import ParsedCall, infer_tool_parser


def reader(parser: str, think: bool = True, prompt: str = "") -> AnswerReader:
    return AnswerReader.for_request(parser, "qwen3" if think else None, WEATHER_TOOLS, True,
                                    prompt)


def streamed(reader: AnswerReader, pieces) -> Answer:
    stream, parts = reader.stream(), []
    for piece in pieces:
        parts += stream.feed(piece)
    parts += stream.finish()
    assert all(p.text or p.call for p in parts)  # nothing empty is sent
    return Answer("".join(p.text for p in parts if p.kind == "reasoning"),
                  "".join(p.text for p in parts if p.kind == "content"),
                  [p.call for p in parts if p.kind == "call"])


def call(name: str, **arguments) -> ParsedCall:
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def test_hermes_answers_parse_as_written():
    hermes = reader("hermes")
    assert hermes.read(HERMES_ANSWERS[0]) == Answer("", "Let me check both.", [
        call("get_weather", city="Zürich — 東京", days=3,
             units={"temp": ["°C", {"wind": None}], "ok": True}),
        call("get_time", zone="CET <tool_call> x")])
    assert hermes.read(HERMES_ANSWERS[1]) == Answer(
        "", "if a < b and c <tool: passDone, ✓ 🎉.", [call("get_time")])
    malformed = HERMES_ANSWERS[2]
    assert hermes.read(malformed) == Answer(
        "", malformed[:malformed.index("\n<tool_call>{")], [call("get_time", zone="UTC")])
    assert hermes.read(HERMES_ANSWERS[3]) == Answer("", HERMES_ANSWERS[3], [])
    assert hermes.read(HERMES_ANSWERS[4]) == Answer(
        "The user wants the weather. <tool_call> here is only thought.", "",
        [call("get_weather", city="Oslo")])


def test_qwen3_coder_answers_parse_with_the_schema_types():
    coder = reader("qwen3_coder")
    assert coder.read(QWEN3_CODER_ANSWERS[0]) == Answer("", "Checking.", [
        call("get_weather", city="São Paulo\nand 北京", days=7,
             units={"temp": "°F", "list": [1, 2, {"x": None}]}),
        call("get_time", zone="Europe/Berlin")])
    twice = QWEN3_CODER_ANSWERS[1]
    assert coder.read(twice) == Answer("", twice, [])
    assert coder.read(QWEN3_CODER_ANSWERS[2]) == Answer("plan: call get_time </think",
                                                        "Sure.", [call("get_time")])


def test_reasoning_opened_by_the_prompt_and_tags_elsewhere_are_text():
    opened = reader("hermes", prompt="<|im_start|>assistant\n<think>\n")
    assert opened.opened and opened.read("a\nb\n</think>\n\nok") == Answer("a\nb", "ok", [])
    assert opened.read("still thinking when cut ") == Answer("still thinking when cut ", "", [])
    assert reader("hermes").read("x <think>y</think>") == Answer("", "x <think>y</think>", [])
    assert reader("hermes", think=False).read(HERMES_ANSWERS[4]).reasoning == ""


ALL_ANSWERS = [("hermes", a) for a in HERMES_ANSWERS] + \
    [("qwen3_coder", a) for a in QWEN3_CODER_ANSWERS]


@pytest.mark.parametrize("parser,answer", ALL_ANSWERS)
def test_streaming_equals_the_whole_answer_at_every_character_boundary(parser, answer):
    answers = reader(parser)
    whole = answers.read(answer)
    assert streamed(answers, [answer]) == whole
    assert streamed(answers, answer) == whole  # one character at a time
    for cut in range(len(answer) + 1):
        assert streamed(answers, [answer[:cut], answer[cut:]]) == whole, cut
    rng = np.random.default_rng(0)
    for _ in range(200):  # random cuts into 3..12 pieces
        cuts = sorted(rng.integers(0, len(answer) + 1, rng.integers(2, 12)))
        pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)])]
        assert streamed(answers, pieces) == whole, cuts


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from plt_port.family import default_model_dir
    from plt_port.tokenizer import Tokenizer

    return Tokenizer.from_dir(default_model_dir())


@pytest.mark.parametrize("parser,answer", ALL_ANSWERS)
def test_streaming_equals_the_whole_answer_at_every_token_boundary(parser, answer,
                                                                   embedded_tokenizer):
    ids = embedded_tokenizer.encode(answer)
    detokenizer = embedded_tokenizer.detokenizer()
    deltas = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == answer
    answers = reader(parser)
    whole = answers.read(answer)
    assert streamed(answers, deltas) == whole  # token by token, as the server streams
    for cut in range(len(deltas) + 1):
        assert streamed(answers, ["".join(deltas[:cut]), "".join(deltas[cut:])]) == whole, cut


def test_the_template_names_its_format():
    assert infer_tool_parser(HERMES_TEMPLATE) == "hermes"
    assert infer_tool_parser(QWEN3_CODER_TEMPLATE) == "qwen3_coder"
    assert infer_tool_parser("{{ messages[0].content }}") is None
    assert infer_tool_parser(None) is None
