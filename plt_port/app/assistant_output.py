"""What a model wrote, as an assistant turn: reasoning, content and tool calls.

Both APIs (OpenAI's chat completions, Anthropic's messages) read answers here, whole
(`read_answer`) or streamed (`AnswerStream`): first the reasoning block (`reasoning.py`),
then the calls in the rest (`tool_parsers.py`). `AnswerReader` says which parsers a request
gets. `forced_output` is the one place where a request asks for output the model must be
forced to write (a required or named tool, one call at most, strict schemas, JSON output):
that needs grammar-constrained decoding, which is not wired into the server yet, so it is
refused there, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import REASONING_PARSERS, ReasoningStream, ThinkTags, prompt_opens_block, \
    split_reasoning
from .service import bad_request
from .tool_parsers import TOOL_PARSERS, CallFormat, ParsedCall, ToolCallStream, \
    parse_tool_calls


@dataclass
class Answer:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass
class AnswerReader:
    """The parsers one request's answer goes through (None: that part is not parsed)."""

    tool_format: CallFormat | None = None
    think: ThinkTags | None = None
    opened: bool = False          # the prompt opened the reasoning block

    @classmethod
    def for_request(cls, tool_parser: str | None, reasoning_parser: str | None,
                    tools: list[dict] | None, parse_calls: bool,
                    prompt_text: str) -> "AnswerReader":
        """`tool_parser`/`reasoning_parser`: the server's choice (names of the registries);
        calls are read only when the request gave tools and allows calls (`parse_calls`),
        which needs a tool parser."""
        if tools and parse_calls and not tool_parser:
            raise bad_request("tools", "the server has no tool-call parser for this model's "
                                       "template; start it with --tool-call-parser NAME")
        think = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None
        tool_format = TOOL_PARSERS[tool_parser](tools) if tool_parser and tools and \
            parse_calls else None
        return cls(tool_format, think, think is not None and prompt_opens_block(prompt_text,
                                                                                 think))

    def read(self, text: str) -> Answer:
        reasoning, content = split_reasoning(text, self.think, self.opened) if self.think \
            else ("", text)
        content, calls = parse_tool_calls(content, self.tool_format) if self.tool_format \
            else (content, [])
        return Answer(reasoning, content, calls)

    def stream(self) -> "AnswerStream":
        return AnswerStream(self)


@dataclass
class Part:
    kind: str                     # "reasoning", "content" or "call"
    text: str = ""
    call: ParsedCall | None = None


class AnswerStream:
    """`feed(text delta)` and `finish()` -> the Parts decided so far, in order."""

    def __init__(self, reader: AnswerReader):
        self.reasoning = ReasoningStream(reader.think, reader.opened) if reader.think else None
        self.calls = ToolCallStream(reader.tool_format) if reader.tool_format else None

    def feed(self, text: str) -> list[Part]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._parts(reasoning, self.calls.feed(content) if self.calls else [content])

    def finish(self) -> list[Part]:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        pieces = (self.calls.feed(content) + self.calls.finish()) if self.calls else [content]
        return self._parts(reasoning, pieces)

    @staticmethod
    def _parts(reasoning: str, pieces: list) -> list[Part]:
        parts = [Part("reasoning", reasoning)] if reasoning else []
        for piece in pieces:
            if isinstance(piece, ParsedCall):
                parts.append(Part("call", call=piece))
            elif piece:
                parts.append(Part("content", piece))
        return parts


# ---- forced output -------------------------------------------------------------------------------
@dataclass
class ForcedOutput:
    """What a request asks the output to be, beyond 'text, with tool calls if the model
    wants': each field is (the API's parameter name, its value) or None."""

    tool_choice: tuple[str, str] | None = None      # "required" or "function NAME"
    single_call: str | None = None                  # the parameter asking for at most one call
    strict_tools: str | None = None                 # the parameter of a strict tool schema
    json_output: tuple[str, str] | None = None      # "json_object" or "json_schema"


def forced_output(forced: ForcedOutput) -> None:
    """Turn what the request forces into decoding constraints. Grammar-constrained decoding
    (runtimes/grammar.py) is not wired into the server yet, so every forced output is
    refused here, naming its parameter; the later wiring replaces this function."""
    later = "needs grammar-constrained decoding, which this server does not run yet"
    if forced.tool_choice is not None:
        param, value = forced.tool_choice
        raise bad_request(param, f"{value} {later}; use \"auto\" or \"none\"")
    if forced.single_call is not None:
        raise bad_request(forced.single_call, f"limiting the answer to one tool call {later}")
    if forced.strict_tools is not None:
        raise bad_request(forced.strict_tools, f"strict tool schemas {later}; send strict: "
                                               f"false (the arguments are then parsed, not "
                                               f"enforced)")
    if forced.json_output is not None:
        param, value = forced.json_output
        raise bad_request(param, f"{value} output {later}")
