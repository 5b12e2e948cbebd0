"""What a model wrote, as an assistant turn: reasoning, content and tool calls.

Both APIs (OpenAI's chat completions, Anthropic's messages) read answers here, whole
(`read_answer`) or streamed (`AnswerStream`): first the reasoning block (`reasoning.py`),
then the calls in the rest (`tool_parsers.py`). `AnswerReader` says which parsers a request
gets. `forced_output` is the one place where what a request forces on the answer (a
required or named tool, one call at most, strict tool schemas, JSON or regex output) becomes
the grammar its decoding follows (`runtimes.grammar.answer_grammar`), in the call format of
the same tool parser that reads the answer back, after the reasoning block its reasoning
parser reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from runtimes.grammar import TOOL_CALL_FORMATS, AnswerFormat, Grammar, GrammarCompiler, \
    GrammarError, ReasoningBlock, answer_constrained, answer_grammar

from .reasoning import REASONING_PARSERS, ReasoningStream, ThinkTags, prompt_opens_block, \
    split_reasoning
from .service import Service, bad_request
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
    """What a request asks its answer to be, in OpenAI's terms (each API maps its own fields
    here), and where those fields are in the request (its errors name them)."""

    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, `strict` kept
    tool_choice: str | dict | None = None           # OpenAI's tool_choice; None: "auto"
    parallel: bool = True                           # False: one call at most
    answer: AnswerFormat | None = None              # what a text answer must be
    tool_schema_param: str = "tools.{}.function.parameters"  # tool i's schema
    tool_choice_param: str = "tool_choice"
    answer_param: str = "response_format"


@contextlib.contextmanager
def refused_as(param: str):
    """A GrammarError raised inside (a schema the library cannot compile, a bad format) as
    the 400 of the request field `param`."""
    try:
        yield
    except GrammarError as exc:
        raise bad_request(param, str(exc)) from None


def forced_output(service: Service, forced: ForcedOutput, reader: AnswerReader
                  ) -> Grammar | None:
    """The grammar that makes the answer what `forced` asks (None: nothing to enforce, and
    nothing is built): calls in the format of the reader's tool parser, after the reasoning
    block its reasoning parser reads; compiled once per distinct request shape (the
    compiler's LRU). An error names the field at fault."""
    call_format = TOOL_CALL_FORMATS[reader.tool_format.name] if reader.tool_format else None
    tools = forced.tools if call_format is not None else []
    with refused_as(forced.tool_choice_param):
        if not answer_constrained(forced.answer, tools, forced.tool_choice, call_format,
                                  forced.parallel):
            return None
    reasoning = ReasoningBlock(reader.think.start, reader.think.end, reader.opened) \
        if reader.think else None
    with refused_as(forced.answer_param if forced.answer else forced.tool_choice_param):
        compiler = service.grammar_compiler()
    try:
        return answer_grammar(compiler, forced.answer, tools, forced.tool_choice, call_format,
                              forced.parallel, reasoning)
    except GrammarError as exc:
        raise field_at_fault(compiler, forced, tools, exc) from None


def field_at_fault(compiler: GrammarCompiler, forced: ForcedOutput, tools: list[dict],
                   error: GrammarError):
    """The 400 of a grammar that did not compile, naming the field at fault: the answer's
    format or a tool's schema when it does not compile alone, else the tool choice."""
    with refused_as(forced.answer_param):
        if forced.answer is not None:
            forced.answer.grammar(compiler)
    for i, tool in enumerate(tools):
        with refused_as(forced.tool_schema_param.format(i)):
            compiler.json_schema(tool["function"].get("parameters") or {},
                                 bool(tool["function"].get("strict")))
    return bad_request(forced.tool_choice_param, str(error))
