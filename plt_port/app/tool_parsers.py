"""Tool-call parsers: the calls a model writes into its answer, as (name, JSON arguments).

A registry of call formats (`TOOL_PARSERS`, chosen by `--tool-call-parser NAME` or inferred
from the chat template as mlx-lm does, `infer_tool_parser`):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen2.5, the
  IQuest-Coder-V1 40B template's format);
- `qwen3_coder`: `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function>
  </tool_call>` (Qwen3-Coder; vLLM's parser of that name), values typed by the tool's schema.

Two readers of the same rules: `parse_tool_calls(text)` for a whole answer (regular
expressions) and `ToolCallStream` for text arriving in pieces cut anywhere (a state machine
that never lets a partial tag out as content). Both give the same content and calls for any
cut of the same text, which the tests check at every character and token boundary:

- a call is the text from a start tag to the first end tag after it; one whose body does not
  parse (not JSON, no name, duplicate parameters, ...) or that never ends stays in the content
  as the text it was, so nothing the model wrote is dropped;
- whitespace right before and right after a parsed call is layout, not content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object


class CallFormat:
    """One registry entry: the tags around a call and how to read the body between them."""

    name = ""
    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self, tools: Sequence[dict] | None = None):
        self.tools = {tool["function"]["name"]: tool["function"] for tool in tools or ()
                      if isinstance(tool.get("function"), dict) and "name" in tool["function"]}

    def parse_body(self, body: str) -> ParsedCall | None:
        """The call in the text between the tags, or None when it is malformed."""
        raise NotImplementedError


def json_object_text(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False)


class HermesFormat(CallFormat):
    name = "hermes"

    def parse_body(self, body: str) -> ParsedCall | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not set(call) <= {"name", "arguments"}:
            return None
        name, arguments = call.get("name"), call.get("arguments", {})
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        return ParsedCall(name, json_object_text(arguments))


FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


class Qwen3CoderFormat(CallFormat):
    name = "qwen3_coder"

    def parse_body(self, body: str) -> ParsedCall | None:
        function = FUNCTION.fullmatch(body)
        if function is None:
            return None
        name, parameters = function.group(1).strip(), function.group(2)
        arguments, pos = {}, 0
        for match in PARAMETER.finditer(parameters):
            key = match.group(1).strip()
            if parameters[pos:match.start()].strip() or key in arguments:
                return None  # text between parameters, or one given twice
            arguments[key] = self.typed_value(name, key, match.group(2))
            pos = match.end()
        if parameters[pos:].strip() or not name:
            return None
        return ParsedCall(name, json_object_text(arguments))

    def typed_value(self, function: str, key: str, text: str):
        """A parameter's value: its text (one newline each side is layout) as the tool's
        schema types it: strings as they are, other declared types as JSON where they parse
        (as vLLM's qwen3_coder parser does, the text otherwise)."""
        text = text.removeprefix("\n").removesuffix("\n")
        schema = ((self.tools.get(function) or {}).get("parameters") or {}).get("properties")
        declared = (schema or {}).get(key, {}).get("type") if isinstance(schema, dict) else None
        if not isinstance(declared, str) or declared.lower() in STRING_TYPES:
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


TOOL_PARSERS: dict[str, type[CallFormat]] = {"hermes": HermesFormat,
                                             "qwen3_coder": Qwen3CoderFormat}


def infer_tool_parser(chat_template: str | None) -> str | None:
    """The format a chat template teaches, as mlx-lm infers it: `<tool_call>` followed by
    `<function=` is qwen3_coder, `<tool_call>` alone hermes; None: the template has neither."""
    if not chat_template or "<tool_call>" not in chat_template:
        return None
    if re.search(r"<tool_call>(\\n|\n)<function=", chat_template):
        return "qwen3_coder"
    return "hermes"


def resolve_tool_parser(name: str | None, chat_template: str | None) -> str | None:
    """The server's tool parser: `--tool-call-parser NAME`, else the template's format."""
    if name is not None and name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}")
    return name or infer_tool_parser(chat_template)


# ---- a whole answer ------------------------------------------------------------------------------
def parse_tool_calls(text: str, fmt: CallFormat) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a whole answer."""
    pattern = re.compile(re.escape(fmt.start) + "(.*?)" + re.escape(fmt.end), re.DOTALL)
    pieces: list[str | ParsedCall] = []
    pos = 0
    for match in pattern.finditer(text):
        call = fmt.parse_body(match.group(1))
        pieces.append(text[pos:match.start()])
        pieces.append(call if call is not None else match.group())
        pos = match.end()
    pieces.append(text[pos:])
    content = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, ParsedCall):
            continue
        if i > 0 and isinstance(pieces[i - 1], ParsedCall):
            piece = piece.lstrip()
        if i + 1 < len(pieces) and isinstance(pieces[i + 1], ParsedCall):
            piece = piece.rstrip()
        content.append(piece)
    return "".join(content), [p for p in pieces if isinstance(p, ParsedCall)]


# ---- an answer arriving in pieces ----------------------------------------------------------------
def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStream:
    """`feed(text)` and `finish()` return what is decided so far, in order: content strings
    and ParsedCalls. Content that could still be the start of a call (a partial tag, and the
    whitespace before it) waits; so does a call until its end tag."""

    def __init__(self, fmt: CallFormat):
        self.fmt = fmt
        self.pending = ""         # undecided text (from a call's start tag when in a call)
        self.in_call = False
        self.layout = ""          # whitespace before the call being read (content if it fails)
        self.after_call = False   # whitespace that follows a parsed call is layout

    def feed(self, text: str) -> list[str | ParsedCall]:
        self.pending += text
        out: list[str | ParsedCall] = []
        while self._advance(out):
            pass
        return [piece for piece in out if piece != ""]

    def _advance(self, out: list) -> bool:
        """Decide what can be decided of `pending`; whether to look again."""
        fmt = self.fmt
        if self.in_call:
            end = self.pending.find(fmt.end, len(fmt.start))
            if end < 0:
                return False
            raw, self.pending = self.pending[:end + len(fmt.end)], self.pending[end + len(fmt.end):]
            call = fmt.parse_body(raw[len(fmt.start):-len(fmt.end)])
            out.append(call if call is not None else self.layout + raw)
            self.in_call, self.layout, self.after_call = False, "", call is not None
            return True
        if self.after_call:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return False
            self.after_call = False
        start = self.pending.find(fmt.start)
        if start >= 0:
            before = self.pending[:start]
            out.append(before.rstrip())
            self.layout = before[len(before.rstrip()):]
            self.pending, self.in_call = self.pending[start:], True
            return True
        undecided = partial_tag_length(self.pending, fmt.start)
        sure = self.pending[:len(self.pending) - undecided]
        cut = len(sure.rstrip())
        out.append(self.pending[:cut])
        self.pending = self.pending[cut:]
        return False

    def finish(self) -> list[str | ParsedCall]:
        """The rest at the end of the answer: held text, and a call that never ended, as text."""
        rest = "" if self.after_call else self.layout + self.pending
        self.pending, self.layout, self.in_call = "", "", False
        return [rest] if rest else []
