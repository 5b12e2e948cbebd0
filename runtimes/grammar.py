"""Grammar-constrained decoding: JSON schemas, regular expressions and Lark grammars turned into
one token mask per sequence per step, on the sampler every backend shares.

Layers of it, each built once:
- `TokenVocabulary` (once per tokenizer and model: `compiler_for`, `model_compiler`): every
  id's exact bytes as `plt_port.tokenizer` decodes them (byte-fallback pieces `<0x0A>` as
  their byte, `▁` as a space, added tokens as their text), the model's eos ids (config.json, generation_config.json
  and the tokenizer) as the one way to end, and ids that are no text (control pieces, rows past
  the tokenizer, eos) as special tokens that no grammar writes.
- `GrammarCompiler.json_schema` / `.regex` / `.lark` (once per distinct source: a bounded LRU
  keyed by the kind and the source, JSON schemas by their compact JSON with key order kept,
  since the order of `properties` is the order the output is written in) -> `Grammar`.
- `Grammar.constraint()` (once per sequence) -> `GrammarConstraint`, the object
  `runtimes.sampling.Sampler(params, constraint)` drives: `mask(logits_row)` (disallowed tokens
  at -inf, applied before every other sampling step), `advance(token)`, `is_terminated()`,
  `rollback(n)` (for speculative decoding). A sequence without a grammar has no constraint and
  pays nothing.

When the grammar is complete the mask allows only the eos ids, so the sequence ends with
finish_reason "stop"; a sequence that reaches max_tokens first ends with "length" and its text is
an unfinished prefix of a valid output. JSON is written compactly on one line with `", "` and
`": "` separators (JSON_LAYOUT): free whitespace lets a model pad forever.

The library is llguidance (Microsoft's guidance engine, one of vLLM's structured-output
backends), chosen over xgrammar on these measurements (this machine's CPU, five JSON schemas
and a regex, 300 random-logit tokens each, the embedded 4,096-token vocabulary and a
76,800-token code vocabulary of LoopCoder's shape from `save_code_tokenizer`):
- dependencies: llguidance is one 3 MB abi3 wheel with none; `import xgrammar` imports torch
  (and its wheel requires torch, transformers and triton), which the MLX and ONNX paths must
  run without.
- speed, both far below a decode step (tens of ms): per-token mask median / mean at 76,800
  tokens, llguidance 14 / 51 us, xgrammar 1.4 / 5.4 us (at 4,096: 8 / 22 us and 1.0 / 2.3 us);
  matcher advance about 1 us for both; compiling a schema 0.4-0.7 ms (llguidance) against
  1-13 ms (xgrammar, which precomputes masks). Applying the mask to numpy logits (about 40 us
  at 76,800) costs as much as computing it.
- numpy: `llguidance.numpy` fills an int32 bitmask in a numpy array; xgrammar's helpers
  allocate torch tensors.
- JSON schema: both cover required fields, enums and const, nested arrays, minimum / maximum
  (exclusive too), string lengths and patterns; llguidance refuses a keyword it cannot enforce
  by name (`uniqueItems`, `contains`, `if`, `not`, ...) instead of ignoring it.
- regex, Lark grammars with inline `%json` schemas (the tool-call wrappers below), rollback of
  any number of tokens: both.
"""

from __future__ import annotations

import collections
import json
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from plt_port.errors import PLTError

try:
    import llguidance
    import llguidance.numpy as llguidance_numpy
except ImportError:  # the `grammar` extra is not installed
    llguidance = None

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_CACHE_SIZE = 64
TOKENIZED_CACHE_SIZE = 4096
SPECIAL_MARKER = 0xFF  # llguidance's first byte of a special token (never in UTF-8 text)


class GrammarError(PLTError, ValueError):
    """A schema, regex or grammar that cannot be compiled, or a token its grammar refuses."""


def library():
    if llguidance is None:
        raise GrammarError("structured output needs the llguidance package "
                           "(pip install 'plt-port[grammar]')")
    return llguidance


class TokenVocabulary:
    """One model's vocabulary as the grammar library sees it (built once: `compiler_for`).

    `token_bytes[i]`: the bytes id i decodes to (`Tokenizer.token_bytes`); `special_ids`: the
    ids that are not text (eos ids, ids that decode to nothing, bytes starting with 0xFF, which
    no UTF-8 text holds): the library never allows them inside a grammar, and allows the eos ids
    exactly where the grammar may end."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        lib = library()
        if not eos_ids:
            raise GrammarError("the model has no eos token: a grammar could not end its sequence")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = np.array(sorted(set(eos_ids)), dtype=np.int64)
        self.eos = eos = frozenset(self.eos_ids.tolist())
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_ids = [i for i, data in enumerate(self.token_bytes)
                            if i in eos or not data or data[0] == SPECIAL_MARKER]
        self.special = frozenset(self.special_ids)
        self.text_ids = {data: i for i, data in reversed(list(enumerate(self.token_bytes)))
                         if i not in self.special}  # bytes -> the lowest id spelling them
        self.longest_token = max(map(len, self.text_ids), default=1)
        self.tokenized: dict[str, list[int]] = {}  # the forced texts of grammars recur
        self.library_tokenizer = lib.LLTokenizer(lib.TokenizerWrapper(_LibraryView(self)),
                                                 n_vocab=vocab_size)

    @property
    def end_id(self) -> int:
        """The eos id the library knows (any eos id is mapped to it)."""
        return int(self.eos_ids[0])

    def tokenize(self, text: str) -> list[int]:
        """Ids that decode to exactly `text` (the library tokenizes the text a grammar forces
        and allows only those tokens there): the tokenizer's own encoding when it decodes back
        to `text` with text ids only (a sentencepiece dummy prefix would not), else the
        longest pieces left to right."""
        ids = self.tokenized.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text)
            exact = all(0 <= i < self.vocab_size and i not in self.special for i in ids) and \
                b"".join(self.token_bytes[i] for i in ids) == text.encode()
            if not exact:
                ids = self.longest_pieces(text.encode())
            if len(self.tokenized) >= TOKENIZED_CACHE_SIZE:
                self.tokenized.clear()
            self.tokenized[text] = ids
        return ids

    def longest_pieces(self, data: bytes) -> list[int]:
        """Greedy longest-match ids of `data`, stopping before a byte no token spells."""
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self.longest_token), start, -1):
                token = self.text_ids.get(data[start:end])
                if token is not None:
                    ids.append(token)
                    start = end
                    break
            else:
                break
        return ids


class _LibraryView:
    """The tokenizer protocol of `llguidance.TokenizerWrapper` over a TokenVocabulary."""

    bos_token_id = None

    def __init__(self, vocabulary: TokenVocabulary):
        special = vocabulary.special
        # a special token's bytes name it (llguidance puts SPECIAL_MARKER first); `<[i]>` is
        # also how a Lark grammar refers to token i
        self.tokens = [f"<[{i}]>".encode() if i in special else data
                       for i, data in enumerate(vocabulary.token_bytes)]
        self.special_token_ids = vocabulary.special_ids
        self.eos_token_id = vocabulary.end_id
        self.tokenize = vocabulary.tokenize

    def __call__(self, text: str | bytes) -> list[int]:
        return self.tokenize(text.decode("utf-8", errors="replace")
                             if isinstance(text, bytes) else text)


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> "GrammarCompiler":
    """The grammar compiler (and TokenVocabulary) of `tokenizer` for a model of `vocab_size`
    ids ending at `eos_ids`: built on first use, kept as long as the tokenizer lives."""
    key = (vocab_size, tuple(sorted(set(eos_ids))))
    with _compilers_lock:
        built = _compilers.setdefault(tokenizer, {})
        if key not in built:
            built[key] = GrammarCompiler(TokenVocabulary(tokenizer, vocab_size, eos_ids))
        return built[key]


def model_compiler(tokenizer, backend) -> "GrammarCompiler":
    """The grammar compiler of a loaded model: its vocabulary size and every id that ends its
    sequences (its config's and generation_config.json's, and the tokenizer's)."""
    return compiler_for(tokenizer, backend.config.vocab_size,
                        set(tokenizer.eos_ids) | set(backend.eos_token_ids))


class Grammar:
    """A compiled grammar (shared, never advanced); `constraint()` starts a sequence on it."""

    def __init__(self, vocabulary: TokenVocabulary, matcher, source: str):
        self.vocabulary = vocabulary
        self.matcher = matcher  # the start state, copied for every sequence
        self.source = source

    def constraint(self) -> "GrammarConstraint":
        return GrammarConstraint(self.vocabulary, self.matcher.deep_copy())


class GrammarConstraint:
    """One sequence's grammar state: the mask of each step and the tokens taken so far."""

    def __init__(self, vocabulary: TokenVocabulary, matcher):
        self.vocabulary = vocabulary
        self.matcher = matcher
        self.bitmask = llguidance_numpy.allocate_token_bitmask(1, vocabulary.vocab_size)
        self.ended_after_stop = False  # an eos taken once the grammar was complete

    def allowed(self) -> np.ndarray:
        """Bool [vocab_size]: the tokens that may come next."""
        llguidance_numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        self.raise_if_error()
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), count=self.vocabulary.vocab_size,
                                bitorder="little").view(bool)
        eos = self.vocabulary.eos_ids
        allowed[eos] = allowed[self.vocabulary.end_id]
        if not allowed.any():
            raise GrammarError("no token of the vocabulary can continue the grammar here")
        return allowed

    def mask(self, logits_row: np.ndarray) -> np.ndarray:
        """`logits_row` [vocab_size] with the tokens the grammar does not allow at -inf."""
        if logits_row.shape[-1] != self.vocabulary.vocab_size:
            raise GrammarError(f"logits of {logits_row.shape[-1]} tokens for a grammar over "
                               f"{self.vocabulary.vocab_size}")
        return np.where(self.allowed(), logits_row, logits_row.dtype.type(-np.inf))

    def advance(self, token: int) -> None:
        if self.ended_after_stop:
            raise GrammarError(f"token {token} after the end of the grammar's sequence")
        if token in self.vocabulary.eos:
            if self.matcher.is_stopped():  # complete: the library takes no more tokens
                self.ended_after_stop = True
                return
            token = self.vocabulary.end_id
        if not self.matcher.consume_token(int(token)):
            self.raise_if_error()
            raise GrammarError(f"token {token} does not continue the grammar")

    def is_terminated(self) -> bool:
        """Whether the grammar is complete: nothing but eos can follow (or eos came)."""
        return self.matcher.is_stopped()

    def rollback(self, n_tokens: int) -> None:
        """Forget the last `n_tokens` tokens advanced (rejected speculative tokens)."""
        if n_tokens and self.ended_after_stop:  # that eos never reached the library
            self.ended_after_stop, n_tokens = False, n_tokens - 1
        if n_tokens and not self.matcher.rollback(n_tokens):
            raise GrammarError(f"cannot roll back {n_tokens} tokens: "
                               f"{self.matcher.get_error() or 'fewer were taken'}")

    def raise_if_error(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {error_summary(self.matcher.get_error())}")


class GrammarCompiler:
    """Grammars over one model's vocabulary, each distinct source compiled once (a bounded LRU
    of `cache_size` grammars; thread-safe: request handlers compile, the engine samples)."""

    def __init__(self, vocabulary: TokenVocabulary, cache_size: int = GRAMMAR_CACHE_SIZE):
        self.vocabulary = vocabulary
        self.cache_size = cache_size
        self.cache: collections.OrderedDict[tuple[str, str], Grammar] = collections.OrderedDict()
        self.lock = threading.Lock()

    def json_schema(self, schema: dict, strict: bool = False) -> Grammar:
        """JSON matching `schema` (JSON Schema semantics; `strict`: OpenAI's strict mode, no
        object property beyond those its schema names). A keyword the library cannot enforce
        is an error naming it, never ignored."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be a JSON object, got "
                               f"{type(schema).__name__}")
        if strict:
            schema = closed_objects(schema)
        source = canonical_json(schema)
        return self._compiled(("json_schema", source), lambda: library().LLMatcher
                              .grammar_from_json_schema(source, defaults=JSON_LAYOUT))

    def regex(self, pattern: str) -> Grammar:
        """Text matching the regular expression `pattern` whole (Rust `regex` syntax, no
        lookaround)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(f"a regex must be a non-empty string, got {pattern!r}")
        return self._compiled(("regex", pattern),
                              lambda: library().LLMatcher.grammar_from_regex(pattern))

    def lark(self, source: str) -> Grammar:
        """Text of a Lark grammar (llguidance's dialect: `%json {...}` inlines a schema)."""
        return self._compiled(("lark", source),
                              lambda: library().LLMatcher.grammar_from_lark(source))

    def _compiled(self, key: tuple[str, str], library_grammar: Callable[[], str]) -> Grammar:
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        grammar = Grammar(self.vocabulary, self._start_matcher(key[0], library_grammar),
                          key[1])
        with self.lock:
            self.cache[key] = grammar
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return grammar

    def _start_matcher(self, kind: str, library_grammar: Callable[[], str]):
        lib = library()
        try:
            text = library_grammar()
        except ValueError as exc:
            raise GrammarError(f"{kind}: {exc}") from None
        matcher = lib.LLMatcher(self.vocabulary.library_tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{kind} cannot be compiled: {error_summary(matcher.get_error())}")
        return matcher


def error_summary(message: str) -> str:
    """The library's error in one line: its first line and its `error:` lines (a regex's
    reason comes on a line of its own, under a picture of the pattern)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines:
        return "unknown error"
    reasons = [line for line in lines[1:] if line.startswith("error:")]
    return " ".join([lines[0].rstrip(":")] + reasons)


def canonical_json(value) -> str:
    """Compact JSON, key order kept (a schema's property order is its output's)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the schema is not JSON: {exc}") from None


SCHEMA_KEYWORDS = ("items", "additionalProperties", "not", "contains", "propertyNames", "if",
                   "then", "else", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions",
                       "dependentSchemas")


def closed_objects(schema):
    """`schema` with `"additionalProperties": false` on every object schema that leaves both it
    and patternProperties out (OpenAI's strict mode asks schemas to say so)."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key, value in schema.items():
        if key in SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            closed[key] = [closed_objects(sub) for sub in value]
        elif key in SCHEMA_KEYWORDS:
            closed[key] = closed_objects(value)
    types = schema.get("type")
    is_object = "properties" in schema or types == "object" or \
        (isinstance(types, list) and "object" in types)
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


# ---- request fields -> grammars (for the server) ---------------------------------------------
#
# An answer is: an optional reasoning block (never constrained, as in vLLM, whose structured
# outputs start after the reasoning), then its body: a text answer (free, or an AnswerFormat)
# and/or tool calls in the call format of the model's template. `answer_grammar` composes them.

@dataclass(frozen=True)
class AnswerFormat:
    """What a text answer must be: JSON matching a schema (`kind` "json_schema", `value` the
    schema, `strict` OpenAI's strict mode), text matching a regex ("regex", the pattern), or
    one of some strings ("choice", the list)."""

    kind: str
    value: object
    strict: bool = False

    def grammar(self, compiler: GrammarCompiler) -> Grammar:
        """The answer alone."""
        if self.kind == "json_schema":
            return compiler.json_schema(self.value, strict=self.strict)
        if self.kind == "regex":
            return compiler.regex(self.value)
        return compiler.lark(f"start: {self.lark()}\n")

    def lark(self) -> str:
        """The answer as a Lark expression (inside a larger grammar)."""
        if self.kind == "json_schema":
            if not isinstance(self.value, dict):
                raise GrammarError(f"a JSON schema must be a JSON object, got "
                                   f"{type(self.value).__name__}")
            return inline_schema(self.value, self.strict)
        if self.kind == "regex":
            return lark_regex(self.value)
        return "(" + " | ".join(map(lark_literal, self.value)) + ")"


def json_answer(schema, strict: bool = False) -> AnswerFormat:
    return AnswerFormat("json_schema", schema, strict)


RESPONSE_FORMAT_KEYS = {"type", "json_schema"}
JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def response_format_answer(response_format) -> AnswerFormat | None:
    """The answer an OpenAI `response_format` asks for: None for none or {"type": "text"}; any
    JSON object for {"type": "json_object"}; {"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}, "strict": bool}} for that schema (strict: OpenAI's strict mode).
    Unknown fields are refused by name."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object")
    unknown = sorted(set(response_format) - RESPONSE_FORMAT_KEYS)
    if unknown:
        raise GrammarError(f"response_format: unknown field(s) {', '.join(unknown)}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_answer({"type": "object"})
    if kind != "json_schema":
        raise GrammarError(f"response_format.type must be text, json_object or json_schema, "
                           f"got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise GrammarError("response_format.json_schema must be an object with a name")
    unknown = sorted(set(spec) - JSON_SCHEMA_KEYS)
    if unknown:
        raise GrammarError(f"response_format.json_schema: unknown field(s) {', '.join(unknown)}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError(f"response_format.json_schema.strict must be true or false, got "
                           f"{strict!r}")
    return json_answer(spec.get("schema", {"type": "object"}), bool(strict))


def response_format_grammar(compiler: GrammarCompiler, response_format) -> Grammar | None:
    """The grammar of an OpenAI `response_format` alone (`response_format_answer`)."""
    answer = response_format_answer(response_format)
    return None if answer is None else answer.grammar(compiler)


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "json_object")


def structured_outputs_answer(spec) -> AnswerFormat:
    """vLLM's `structured_outputs` extra: exactly one of {"json": schema}, {"regex": pattern},
    {"choice": [strings]}, {"json_object": true}; its other options are refused by name."""
    if not isinstance(spec, dict):
        raise GrammarError("structured_outputs must be an object")
    unknown = sorted(set(spec) - set(STRUCTURED_OUTPUT_KINDS))
    if unknown:
        raise GrammarError(f"structured_outputs: {', '.join(unknown)} not supported (only "
                           f"{', '.join(STRUCTURED_OUTPUT_KINDS)})")
    given = [kind for kind in STRUCTURED_OUTPUT_KINDS if spec.get(kind) not in (None, False)]
    if len(given) != 1:
        raise GrammarError(f"structured_outputs: give exactly one of "
                           f"{', '.join(STRUCTURED_OUTPUT_KINDS)}")
    kind, value = given[0], spec[given[0]]
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"structured_outputs.json is not JSON: {exc}") from None
        return json_answer(value)
    if kind == "json_object":
        return json_answer({"type": "object"})
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise GrammarError(f"structured_outputs.regex must be a non-empty string, got "
                               f"{value!r}")
        return AnswerFormat("regex", value)
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v for v in value):
        raise GrammarError("structured_outputs.choice must be a list of non-empty strings")
    return AnswerFormat("choice", value)


@dataclass(frozen=True)
class ReasoningBlock:
    """The reasoning block (`start` ... `end`, e.g. <think> ... </think>) a model may write
    before a constrained answer, left free; `opened`: the prompt opened it, so the answer
    starts inside it (the block must end before the answer)."""

    start: str
    end: str
    opened: bool = False

    def rules(self, text_first: bool) -> tuple[str, str]:
        """(the Lark expression before the body, its rules): the block is one lazy lexeme
        ending at the first end tag, required when the prompt opened it, else optional, with
        whitespace around it. Before free text (`text_first`, which takes whitespace itself)
        only a block the prompt opened is written out: one the model opens is part of the
        text (a call's lazy start tag inside it would win over the block anyway)."""
        rule = f"reasoning[lazy]: /(.|\\n)*{regex_text(self.end)}/\nWS: /[ \\t\\r\\n]+/\n"
        if text_first:
            return ("reasoning ", rule) if self.opened else ("", "")
        if self.opened:
            return "reasoning WS? ", rule
        return f"(WS? {lark_literal(self.start)} reasoning)? WS? ", rule


@dataclass(frozen=True)
class ToolCallFormat:
    """How a chat template writes one tool call: `start` (the tag every call begins with),
    then what `call(index, name, parameters, strict)` gives: the Lark rules of the rest of a
    call of function `name` whose arguments match the JSON schema `parameters`, starting at
    rule `call_{index}`; `rules` are rules those calls share; calls are separated by
    `separator`."""

    name: str
    call: Callable[[int, str, dict, bool], str]
    rules: str = ""
    separator: str = "\n"
    start: str = "<tool_call>"


def lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$#&-~/")


def regex_text(text: str) -> str:
    """A regex (inside a Lark /.../) matching `text` exactly."""
    return "".join("\\" + c if c in REGEX_SPECIAL else c for c in text)


def lark_regex(pattern: str) -> str:
    """`pattern` as a Lark regex terminal: /.../, its unescaped slashes escaped."""
    out, escaped = [], False
    for c in pattern:
        out.append("\\/" if c == "/" and not escaped else c)
        escaped = c == "\\" and not escaped
    return "/" + "".join(out) + "/"


def inline_schema(schema: dict, strict: bool) -> str:
    """A Lark `%json` of `schema`, in JSON_LAYOUT (a schema's own x-guidance wins)."""
    schema = closed_objects(schema) if strict else schema
    return "%json " + canonical_json({"x-guidance": JSON_LAYOUT, **schema})


def hermes_call(index: int, name: str, parameters: dict, strict: bool) -> str:
    """`<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>` (Hermes / Qwen2.5, the
    IQuest-Coder template), after its start tag."""
    head = lark_literal('\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ')
    tail = lark_literal("}\n</tool_call>")
    return f"call_{index}: {head} {inline_schema(parameters, strict)} {tail}\n"


def qwen3_coder_call(index: int, name: str, parameters: dict, strict: bool) -> str:
    """`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
    </function>\\n</tool_call>` (vLLM's qwen3_coder parser), after its start tag: the
    properties in schema order, required ones always, the others optional; a string value is
    raw text (one of its `enum`/`const` values when it has them), any other value JSON
    matching its schema."""
    required = set(parameters.get("required") or ())
    definitions = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    rules, items = [], []
    for number, (key, schema) in enumerate((parameters.get("properties") or {}).items()):
        rule = f"param_{index}_{number}"
        items.append(rule if key in required else f"{rule}?")
        head = lark_literal(f"<parameter={key}>\n")
        if written_raw(schema):
            rules.append(f"{rule}: {head} {raw_string(rule, name, key, schema)}")
        else:
            value = inline_schema({**definitions, **schema}, strict)
            rules.append(f"{rule}: {head} {value} {lark_literal(PARAMETER_END)}\n")
    head = lark_literal(f"\n<function={name}>\n")
    tail = lark_literal("</function>\n</tool_call>")
    return f"call_{index}: {head} {' '.join(items)} {tail}\n" + "".join(rules)
def written_raw(schema) -> bool:
    """Whether the qwen3_coder parser reads the value as a string: type "string", or no type
    (its default) unless enum/const give other values."""
    if not isinstance(schema, dict) or schema.get("type", "string") != "string":
        return False
    values = [schema["const"]] if "const" in schema else schema.get("enum", [])
    return "type" in schema or all(isinstance(v, str) for v in values)


def raw_string(rule: str, function: str, key: str, schema: dict) -> str:
    """Rules of a string parameter `rule` written raw, then the end of the parameter."""
    unsupported = sorted({"pattern", "format"} & set(schema))
    if unsupported:
        raise GrammarError(f"tool {function!r}, parameter {key!r}: {', '.join(unsupported)} "
                           f"of a string cannot be enforced in the qwen3_coder format (its "
                           f"strings are raw text)")
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if values is not None:
        if not all(isinstance(v, str) for v in values):
            raise GrammarError(f"tool {function!r}, parameter {key!r}: a string with "
                               f"non-string enum values")
        return f"({' | '.join(map(lark_literal, values))}) {lark_literal(PARAMETER_END)}\n"
    if "minLength" not in schema and "maxLength" not in schema:
        return "raw_text\n"
    length = f"{{{int(schema.get('minLength', 0))},{schema.get('maxLength', '')}}}"
    return (f"{rule}_text\n{rule}_text[suffix={lark_literal(PARAMETER_END)}]: "
            f"/(.|\\n){length}/\n")


PARAMETER_END = "\n</parameter>\n"

TOOL_CALL_FORMATS = {
    "hermes": ToolCallFormat("hermes", hermes_call),
    "qwen3_coder": ToolCallFormat(
        "qwen3_coder", qwen3_coder_call,
        rules=f"raw_text[suffix={lark_literal(PARAMETER_END)}]: /(.|\\n)*/\n"),
}


def answer_grammar(compiler: GrammarCompiler, answer: AnswerFormat | None = None,
                   tools: Sequence[dict] = (), tool_choice=None,
                   call_format: ToolCallFormat | None = None, parallel: bool = True,
                   reasoning: ReasoningBlock | None = None) -> Grammar | None:
    """The grammar of an answer (None: nothing to enforce), after `reasoning` when given.

    `tools`: OpenAI function tools ([{"type": "function", "function": {"name", "parameters",
    "strict"}}]), called in `call_format` (None: the answer has no calls); `tool_choice`:
    - "required": one call of any tool (one or more, separated, when `parallel`); {"type":
      "function", "function": {"name": N}}: one call of N; `answer` does not apply;
    - "auto" or None: `answer` when given, or calls instead; without `answer`, free text with
      calls in it. Only then are the calls constrained when a tool is strict or `parallel` is
      false (at most one call): else nothing is (None);
    - "none": `answer` alone (None without it).
    Each call's arguments match its tool's parameters (closed objects when the tool is
    strict)."""
    if not answer_constrained(answer, tools, tool_choice, call_format, parallel):
        return None
    functions = [tool_function(tool) for tool in tools]
    forced = tool_choice not in (None, "auto", "none")
    if forced:
        functions = choose_functions(functions, tool_choice)
        if call_format is None:
            raise GrammarError("a forced tool_choice needs the model's tool-call format")
    calls = forced or (tool_choice != "none" and bool(functions) and call_format is not None)
    if not calls and reasoning is None:
        return answer.grammar(compiler)
    many = parallel and tool_choice in (None, "auto", "required")
    rules = call_rules(functions, call_format) if calls else ""
    call_list = "call" + (f" ({lark_literal(call_format.separator)} call)*"
                          if calls and many else "")
    text_first = not forced and answer is None
    if forced:
        body = call_list
    elif answer is not None:
        body = "answer" + (f" | {call_list}" if calls else "")
        rules += f"answer: {answer.lark()}\n"
    else:  # free text with calls in it: a call starts at the first start tag
        body = f"(lead call_body){'*' if many else '?'} text"
        rules += (f"lead[lazy]: TEXT {lark_literal(call_format.start)}\ntext: TEXT\n"
                  f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{regex_text(call_format.start)}(.|\\n)*/\n")
    prefix, reasoning_rules = reasoning.rules(text_first) if reasoning else ("", "")
    return compiler.lark(f"start: {prefix}body\nbody: {body}\n{rules}{reasoning_rules}")


def answer_constrained(answer: AnswerFormat | None, tools: Sequence[dict], tool_choice,
                       call_format: ToolCallFormat | None, parallel: bool) -> bool:
    """Whether `answer_grammar` of these gives a grammar (cheap: nothing is compiled)."""
    if tool_choice not in (None, "auto", "none") or answer is not None:
        return True
    calls = tool_choice != "none" and bool(tools) and call_format is not None
    return calls and (not parallel or any(tool_function(tool).get("strict") for tool in tools))


def choose_functions(functions: list[dict], tool_choice) -> list[dict]:
    """The functions a forced tool_choice ("required" or a named function) allows."""
    if not functions:
        raise GrammarError("tool_choice needs at least one tool")
    if tool_choice == "required":
        return functions
    name = chosen_function(tool_choice)
    chosen = [f for f in functions if f["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    return chosen


def call_rules(functions: list[dict], call_format: ToolCallFormat) -> str:
    """`call` (the start tag, then `call_body`: a call of one of `functions`) and its rules."""
    rules = "".join(call_format.call(i, f["name"], f.get("parameters") or
                                     {"type": "object", "properties": {}}, bool(f.get("strict")))
                    for i, f in enumerate(functions))
    alternatives = " | ".join(f"call_{i}" for i in range(len(functions)))
    return (f"call: {lark_literal(call_format.start)} call_body\ncall_body: {alternatives}\n"
            f"{rules}{call_format.rules}")


def tool_function(tool) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise GrammarError("each tool must be {\"type\": \"function\", \"function\": "
                           "{\"name\": ..., \"parameters\": {...}}}")
    if not isinstance(function.get("parameters", {}), dict):
        raise GrammarError(f"tool {function['name']!r}: parameters must be a JSON schema object")
    return function


def chosen_function(tool_choice) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type") != "function" or \
            not isinstance(function.get("name"), str):
        raise GrammarError(f"tool_choice must be \"none\", \"auto\", \"required\" or "
                           f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                           f"{tool_choice!r}")
    return function["name"]
