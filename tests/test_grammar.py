"""Grammar-constrained decoding (runtimes/grammar.py) on the embedded models: outputs that parse
and validate (jsonschema) where the same model unconstrained writes broken JSON, the same
greedy text on every backend, regexes, forced tool calls, a constrained batch that leaves its
free neighbours' text alone, clear errors, and the vocabulary handed to the library checked
token by token against the project's tokenizer."""

from __future__ import annotations

import json
import os
import queue
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from plt_port import family  # noqa: E402
from plt_port.app.cli import main  # noqa: E402
from plt_port.random_model import save_code_tokenizer  # noqa: E402
from plt_port.tokenizer import Tokenizer  # noqa: E402
from runtimes.backends import BACKENDS, load_backend  # noqa: E402
from runtimes.engine import BatchEngine, Request, TokenEvent  # noqa: E402
from runtimes.generate import generate  # noqa: E402
from runtimes.grammar import (TOOL_CALL_FORMATS, AnswerFormat,  # noqa: E402
                              GrammarCompiler, GrammarError, ReasoningBlock, TokenVocabulary,
                              answer_grammar, compiler_for, json_answer, model_compiler,
                              response_format_grammar, structured_outputs_answer)
from runtimes.sampling import Sampler, SamplingError, SamplingParams  # noqa: E402

PROMPT = "config = "

TOOL_PARAMETERS = {"type": "object", "properties": {
    "path": {"type": "string", "maxLength": 24},
    "start_line": {"type": "integer", "minimum": 1, "maximum": 9999},
    "mode": {"enum": ["text", "bytes"]},
    "flags": {"type": "array", "items": {"enum": ["-n", "-v"]}, "maxItems": 2}},
    "required": ["path", "mode"], "additionalProperties": False}

SCHEMAS = {
    "required fields": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "active": {"type": "boolean"}},
        "required": ["name", "id", "active"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "version": {"const": 3}},
        "required": ["color", "size", "version"], "additionalProperties": False},
    "nested arrays": {"type": "object", "properties": {
        "matrix": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -9,
                                                      "maximum": 9}}},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 6}}},
        "required": ["matrix", "tags"], "additionalProperties": False},
    "number ranges": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                  "multipleOf": 0.0625}},  # exact in binary (jsonschema divides floats)
        "required": ["age", "score", "ratio"], "additionalProperties": False},
    "tool parameters": TOOL_PARAMETERS,
}
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": TOOL_PARAMETERS}},
         {"type": "function", "function": {"name": "list_dir", "parameters": {
             "type": "object", "properties": {"depth": {"type": "integer", "minimum": 0,
                                                        "maximum": 3}},
             "required": ["depth"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def embedded():
    """(torch backend, tokenizer, grammar compiler) of the embedded two-loop model."""
    model_dir = family.default_model_dir()
    backend = load_backend("torch", model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    return backend, tokenizer, model_compiler(tokenizer, backend)


def run_requests(backend, tokenizer, requests, max_batch=32) -> list[tuple[str, str]]:
    """(text, finish_reason) of each Request, all run through one BatchEngine."""
    engine = BatchEngine(lambda loops: backend, tokenizer, max_batch=max_batch,
                         max_queue=len(requests)).start()
    try:
        inboxes = []
        for request in requests:
            inbox = queue.Queue()
            request.emit = inbox.put
            engine.submit(request)
            inboxes.append(inbox)
        return [collect(inbox) for inbox in inboxes]
    finally:
        engine.close()


def collect(inbox) -> tuple[str, str]:
    pieces = []
    while True:
        event = inbox.get(timeout=120)
        if not isinstance(event, TokenEvent):
            raise event
        pieces.append(event.text)
        if event.finish_reason is not None:
            return "".join(pieces), event.finish_reason


def request(tokenizer, seed, grammar=None, max_new_tokens=96, temperature=1.0) -> Request:
    return Request(tokenizer.encode(PROMPT), max_new_tokens, print,
                   SamplingParams(temperature=temperature, seed=seed), grammar=grammar)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_50_seeds_x_5_schemas_all_completed_outputs_validate(embedded):
    """Sampled at temperature 1 with 50 seeds per schema: every output that completed parses
    and validates, and nearly all complete; unconstrained, the same seeds write no valid JSON."""
    backend, tokenizer, compiler = embedded
    requests = [request(tokenizer, seed, compiler.json_schema(schema))
                for schema in SCHEMAS.values() for seed in range(50)]
    free = [request(tokenizer, seed) for seed in range(50)]
    results = run_requests(backend, tokenizer, requests + free)
    for number, (name, schema) in enumerate(SCHEMAS.items()):
        outputs = results[50 * number:50 * (number + 1)]
        completed = [text for text, finish in outputs if finish == "stop"]
        assert len(completed) >= 45, (name, outputs)
        assert all(valid(text, schema) for text in completed), (name, completed)
        unfinished = [text for text, finish in outputs if finish == "length"]
        assert all(text.startswith("{") for text in unfinished)
    free_texts = [text for text, _ in results[-50:]]
    assert not any(valid(text, schema) for text in free_texts for schema in SCHEMAS.values())


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_same_greedy_text_on_every_backend(name):
    model_dir = family.default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    texts = {}
    for backend_name in BACKENDS:
        backend = load_backend(backend_name, model_dir, dtype="float32")
        grammar = model_compiler(tokenizer, backend).json_schema(SCHEMAS[name])
        texts[backend_name], last = generate(backend, tokenizer, PROMPT, max_new_tokens=96,
                                             grammar=grammar)
        assert last.finish_reason == "stop" and valid(texts[backend_name], SCHEMAS[name])
    assert len(set(texts.values())) == 1, texts


REGEXES = [r"[a-z_]{1,12}\(\d{1,3}(, \d{1,3}){0,3}\)", r"(0|[1-9]\d{0,3})(\.\d{1,2})?",
           r"\d{4}-(0[1-9]|1[0-2])-\d{2}", r"(yes|no|maybe)!?"]


def test_regex_outputs_match(embedded):
    backend, tokenizer, compiler = embedded
    requests = [request(tokenizer, seed, compiler.regex(pattern), max_new_tokens=48)
                for pattern in REGEXES for seed in range(10)]
    results = run_requests(backend, tokenizer, requests)
    for number, pattern in enumerate(REGEXES):
        outputs = results[10 * number:10 * (number + 1)]
        assert all(finish == "stop" and re.fullmatch(pattern, text)
                   for text, finish in outputs), (pattern, outputs)


def test_free_requests_beside_constrained_ones_get_their_solo_text(embedded):
    """A batch mixing constrained (sampled) and free (greedy and seeded) requests: each free
    request's text is exactly the one it gets alone (generate, no engine)."""
    backend, tokenizer, compiler = embedded
    grammar = compiler.json_schema(SCHEMAS["nested arrays"])
    free_prompts = ["def parse(", "import os\n", "class Stack:\n    ", "for i in range("]
    free = [Request(tokenizer.encode(p), 24, print, SamplingParams(temperature=0.8, seed=i))
            for i, p in enumerate(free_prompts)]
    constrained = [request(tokenizer, seed, grammar, max_new_tokens=24) for seed in range(4)]
    results = run_requests(backend, tokenizer, [r for pair in zip(constrained, free)
                                                for r in pair])
    for i, prompt in enumerate(free_prompts):
        alone, _ = generate(backend, tokenizer, prompt, max_new_tokens=24,
                            sampling=SamplingParams(temperature=0.8, seed=i))
        assert results[2 * i + 1][0] == alone
    assert all(text.startswith('{"matrix": [') for text, _ in results[0::2])


def test_max_tokens_before_the_grammar_completes_ends_with_length(embedded):
    backend, tokenizer, compiler = embedded
    text, last = generate(backend, tokenizer, PROMPT, max_new_tokens=4,
                          grammar=compiler.json_schema(SCHEMAS["number ranges"]))
    assert last.finish_reason == "length" and last.generation_tokens == 4
    assert text.startswith('{"age": ') or '{"age": '.startswith(text)


def test_response_formats_and_strict_mode(embedded):
    backend, tokenizer, compiler = embedded
    open_schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                          "maximum": 9}}, "required": ["a"]}
    closed = {**open_schema, "additionalProperties": False}
    cases = [({"type": "json_object"}, {"type": "object"}),
             ({"type": "json_schema", "json_schema": {"name": "a", "schema": open_schema,
                                                      "strict": True}}, closed)]
    for response_format, schema in cases:
        grammar = response_format_grammar(compiler, response_format)
        results = run_requests(backend, tokenizer, [request(tokenizer, seed, grammar)
                                                    for seed in range(8)])
        completed = [text for text, finish in results if finish == "stop"]
        assert completed and all(valid(text, schema) for text in completed), results
    assert response_format_grammar(compiler, {"type": "text"}) is None
    assert response_format_grammar(compiler, None) is None


def parse_hermes(text: str) -> list[tuple[str, dict]]:
    calls = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.S)
    return [(call["name"], call["arguments"]) for call in map(json.loads, calls)]


def parse_qwen3_coder(text: str, tools) -> list[tuple[str, dict]]:
    """The qwen3_coder convention: string parameters raw, others JSON."""
    schemas = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in tools}
    calls = []
    for name, body in re.findall(r"<tool_call>\n<function=(.*?)>\n(.*?)</function>\n"
                                 r"</tool_call>", text, re.S):
        arguments = {}
        for key, value in re.findall(r"<parameter=(.*?)>\n(.*?)\n</parameter>\n", body, re.S):
            schema = schemas[name][key]
            raw = schema.get("type", "string") == "string" and \
                all(isinstance(v, str) for v in schema.get("enum", []))
            arguments[key] = value if raw else json.loads(value)
        calls.append((name, arguments))
    return calls


@pytest.mark.parametrize("format_name", list(TOOL_CALL_FORMATS))
def test_forced_tool_calls_parse_and_their_arguments_validate(embedded, format_name):
    backend, tokenizer, compiler = embedded
    call_format = TOOL_CALL_FORMATS[format_name]
    parse = parse_hermes if format_name == "hermes" else \
        (lambda text: parse_qwen3_coder(text, TOOLS))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    choices = [("required", False), ({"type": "function", "function": {"name": "list_dir"}},
                                     False), ("required", True)]
    for choice, parallel in choices:
        grammar = answer_grammar(compiler, tools=TOOLS, tool_choice=choice,
                                 call_format=call_format, parallel=parallel)
        results = run_requests(backend, tokenizer, [request(tokenizer, seed, grammar,
                                                            max_new_tokens=128)
                                                    for seed in range(6)])
        # parallel calls go on until max_tokens: their complete calls count
        completed = [text for text, finish in results if parallel or finish == "stop"]
        assert len(completed) >= 4, results
        calls = [parse(text) for text in completed]
        assert all(len(c) == 1 if not parallel else c for c in calls), calls
        for name, arguments in sum(calls, []):
            jsonschema.validate(arguments, schemas[name])
            assert isinstance(choice, str) or name == "list_dir"
    assert answer_grammar(compiler, tools=TOOLS, tool_choice="auto",
                          call_format=call_format) is None


def takes(grammar, text: str) -> str | None:
    """How the grammar takes `text` token by token: "end" (eos may follow), "prefix" (it
    must go on), None (a token of it is masked)."""
    constraint, vocabulary = grammar.constraint(), grammar.vocabulary
    for token in vocabulary.tokenize(text):
        if not constraint.allowed()[token]:
            return None
        constraint.advance(token)
    return "end" if constraint.allowed()[vocabulary.end_id] else "prefix"


STRICT_TOOLS = [
    {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
    {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"b": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
EXTRA_KEY = '<tool_call>\n{"name": "f", "arguments": {"a": 1, "z": 2}}\n</tool_call>'
OPEN_CALL = '<tool_call>\n{"name": "g", "arguments": {"b": "x", "z": 2}}\n</tool_call>'
THINK, OPENED = ReasoningBlock("<think>", "</think>"), ReasoningBlock("<think>", "</think>", True)
HERMES = TOOL_CALL_FORMATS["hermes"]
COMPOSITIONS = [  # (answer_grammar arguments, {text: how it is taken})
    (dict(tools=STRICT_TOOLS, tool_choice="required", reasoning=OPENED),
     {f"x</think>\n{CALL}": "end", f"x <tool_call></think>{CALL}\n{CALL}": "end",
      "x</think>hi": None, f"x</think>{EXTRA_KEY}": None, CALL: "prefix"}),
    (dict(tools=STRICT_TOOLS, tool_choice="required", parallel=False, reasoning=THINK),
     {CALL: "end", f"\n{CALL}": "end", f"\n<think>y <tool_call></think>\n\n{CALL}": "end",
      "hi": None, OPEN_CALL: "end", f"{CALL}\n<": None}),
    (dict(tools=STRICT_TOOLS, tool_choice="auto"),  # strict: calls in free text enforced
     {f"hi {CALL} bye": "end", "just <tool text": "end", f"hi {EXTRA_KEY}": None,
      f"{CALL}\n{CALL}": "end", "x <tool_call> y": None}),
    (dict(tools=STRICT_TOOLS[1:], parallel=False),  # one call at most
     {f"hi {OPEN_CALL} bye": "end", f"{OPEN_CALL}\n{OPEN_CALL}": None}),
    (dict(tools=STRICT_TOOLS, reasoning=OPENED),
     {"a <tool_call> b</think>hello": "end", f"a</think>{CALL}": "end",
      f"a</think>{EXTRA_KEY}": None}),
    (dict(answer=json_answer({"type": "object", "properties": {"x": {"type": "integer"}},
                              "required": ["x"]}), tools=STRICT_TOOLS),  # JSON, or calls
     {'{"x": 1}': "end", CALL: "end", "hi": None, '{"y": 1}': None}),
    (dict(answer=json_answer({"type": "object"}), tools=STRICT_TOOLS, tool_choice="none",
          reasoning=THINK), {'{"x": 1}': "end", '<think>a</think>\n{"x": 1}': "end",
                             CALL: None}),
    (dict(answer=AnswerFormat("regex", r"a/b\/c[0-9]+"), reasoning=OPENED),
     {"x</think>a/b/c12": "end", "x</think>a/bc": None}),
    (dict(answer=structured_outputs_answer({"choice": ["yes", "no"]})),
     {"yes": "end", "no": "end", "maybe": None}),
]


@pytest.mark.parametrize("arguments,texts", COMPOSITIONS)
def test_answer_grammars_compose_reasoning_text_json_and_calls(embedded, arguments, texts):
    grammar = answer_grammar(embedded[2], call_format=HERMES, **arguments)
    assert {text: takes(grammar, text) for text in texts} == texts


def test_answers_without_constraints_have_no_grammar(embedded):
    compiler = embedded[2]
    for arguments in (dict(tools=TOOLS), dict(tools=STRICT_TOOLS, tool_choice="none"),
                      dict(tools=STRICT_TOOLS[1:], reasoning=THINK), dict()):
        assert answer_grammar(compiler, call_format=HERMES, **arguments) is None


def test_clear_errors(embedded, tmp_path, capsys):
    _, _, compiler = embedded
    bad = [(lambda: compiler.json_schema({"type": "array", "uniqueItems": True}),
            r"Unimplemented keys: \[\"uniqueItems\"\]"),
           (lambda: compiler.json_schema({"type": "frobnicate"}), "Invalid type: frobnicate"),
           (lambda: compiler.json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
            "minimum .5. is greater than maximum .1."),
           (lambda: compiler.json_schema([{"type": "object"}]), "must be a JSON object"),
           (lambda: compiler.regex("(?=a)b"), "look-around"),
           (lambda: compiler.regex("a(b"), "unclosed group"),
           (lambda: response_format_grammar(compiler, {"type": "json_schema",
                                                       "json_schema": {"name": "x",
                                                                       "strict": "yes"}}),
            "strict must be true or false"),
           (lambda: response_format_grammar(compiler, {"type": "xml"}),
            "must be text, json_object or json_schema"),
           (lambda: response_format_grammar(compiler, {"type": "json_object", "x": 1}),
            r"unknown field\(s\) x"),
           (lambda: answer_grammar(compiler, tools=TOOLS, tool_choice={
               "type": "function", "function": {"name": "rm"}},
               call_format=TOOL_CALL_FORMATS["hermes"]), "'rm', which is not"),
           (lambda: answer_grammar(compiler, tools=[{"type": "function", "function": {
               "name": "f", "parameters": {"type": "object", "properties": {
                   "p": {"type": "string", "pattern": "^a"}}}}}], tool_choice="required",
               call_format=TOOL_CALL_FORMATS["qwen3_coder"]),
            "pattern of a string cannot be enforced"),
           (lambda: answer_grammar(compiler, tools=TOOLS, tool_choice="required"),
            "needs the model's tool-call format"),
           (lambda: structured_outputs_answer({"grammar": "start: x"}), "grammar not supported"),
           (lambda: structured_outputs_answer({"json": {}, "regex": "a"}), "exactly one"),
           (lambda: structured_outputs_answer({"choice": []}), "list of non-empty strings"),
           (lambda: structured_outputs_answer({"json": "{nope"}), "json is not JSON")]
    for make, message in bad:
        with pytest.raises(GrammarError, match=message):
            make()
    schema_file = tmp_path / "bad.json"
    schema_file.write_text('{"type": "array", "contains": {"type": "integer"}}')
    for option, message in ((["--json-schema", str(schema_file)],
                             'Unimplemented keys: ["contains"]'),
                            (["--regex", "(?<=a)b"], "look-around"),
                            (["--json-schema", str(tmp_path / "missing.json")], "no such file")):
        assert main(["generate", *option, "x"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("plt-port generate: error: ") and err.count("\n") == 1
        assert message in err and "Traceback" not in err


def test_the_cli_writes_what_the_schema_and_the_regex_ask(tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["enums"]))
    for option, check in ((["--json-schema", str(schema_file)],
                           lambda text: valid(text, SCHEMAS["enums"])),
                          (["--regex", REGEXES[2]], lambda text: re.fullmatch(REGEXES[2], text))):
        assert main(["generate", *option, "--temperature", "1", "--seed", "3", PROMPT]) == 0
        out, err = capsys.readouterr()
        assert check(out.rstrip("\n")) and "finish: stop" in err, out


def check_vocabulary(tokenizer, vocabulary: TokenVocabulary) -> None:
    """Every id the library may write decodes to exactly the tokenizer's bytes for it, alone
    and in sequences; the ids it may not write are exactly the eos ids and the non-text ids."""
    library = vocabulary.library_tokenizer
    text_ids = [i for i in range(vocabulary.vocab_size) if i not in vocabulary.special]
    assert [library.decode_bytes([i]) for i in text_ids] == \
        [tokenizer.token_bytes(i) for i in text_ids]
    eos = set(vocabulary.eos_ids.tolist())
    assert set(vocabulary.special_ids) == eos | {
        i for i in range(vocabulary.vocab_size)
        if not tokenizer.token_bytes(i) or tokenizer.token_bytes(i)[0] == 0xFF}
    assert all(library.is_special_token(i) for i in vocabulary.special_ids)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.choice(text_ids, 12).tolist()
        assert library.decode_bytes(ids).decode("utf-8", errors="replace") == \
            tokenizer.decode(ids)
    for text in ['{"a": [1, 2]}', "  def f(x):\n\treturn x  # é 日本", "<tool_call>"]:
        assert b"".join(tokenizer.token_bytes(i) for i in vocabulary.tokenize(text)) == \
            text.encode()


def test_the_vocabulary_is_the_tokenizers_sentencepiece(make_model):
    """The embedded sentencepiece tokenizer (byte fallback, ▁ spaces); eos ids: the model's
    config, its generation_config.json and the tokenizer, all of them."""
    model_dir = make_model("plt", eos_token_id=[2, 7])
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [9]}, f)
    backend = load_backend("torch", model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    compiler = model_compiler(tokenizer, backend)
    assert compiler is model_compiler(tokenizer, backend)  # built once per tokenizer
    assert compiler.vocabulary.eos_ids.tolist() == [2, 7, 9]
    check_vocabulary(tokenizer, compiler.vocabulary)
    constraint = compiler.json_schema({"const": 1}).constraint()
    constraint.advance(tokenizer.encode("1")[0])
    assert np.flatnonzero(constraint.allowed()).tolist() == [2, 7, 9]
    constraint.advance(7)  # any of them ends the grammar
    assert constraint.is_terminated()


@pytest.fixture(scope="module")
def loopcoder_vocabulary(tmp_path_factory):
    """A 76,800-id tokenizer.json of LoopCoder's shape, with two added tokens."""
    out = save_code_tokenizer(tmp_path_factory.mktemp("tok76800"), 76_800,
                              ("<tool_call>", "</tool_call>"))
    tokenizer = Tokenizer.from_dir(out)
    return tokenizer, compiler_for(tokenizer, 76_800, tokenizer.eos_ids)


def test_the_vocabulary_is_the_tokenizers_at_76800_ids(loopcoder_vocabulary):
    tokenizer, compiler = loopcoder_vocabulary
    assert tokenizer.vocab_size == 76_800 and tokenizer.encode("<tool_call>") == [259]
    check_vocabulary(tokenizer, compiler.vocabulary)
    assert compiler.vocabulary.special_ids == [0, 1, 2, 258]  # <unk>, <s>, </s>, <0xFF>


def test_a_byte_level_vocabulary_and_a_model_wider_than_its_tokenizer(tmp_path):
    from conftest import write_fast_tokenizer

    tokenizer = Tokenizer.from_dir(write_fast_tokenizer(tmp_path, 400, {400: "<|tool|>"}))
    vocabulary = compiler_for(tokenizer, 512, tokenizer.eos_ids).vocabulary
    check_vocabulary(tokenizer, vocabulary)
    assert set(range(401, 512)) <= vocabulary.special  # padded rows: no text


def test_forced_text_is_tokenized_to_exactly_its_bytes_despite_a_dummy_prefix(tmp_path):
    """A sentencepiece model that adds a dummy prefix ("▁{" for "{"): the library gets ids
    that decode to the forced text itself, so the mask at a forced `{"` holds no space."""
    import sentencepiece as spm
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    spm.SentencePieceTrainer.train(
        input=os.path.join(stdlib, "textwrap.py"), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.decode(tokenizer.encode("{")) != "{"  # the tokenizer's own encoding
    compiler = compiler_for(tokenizer, tokenizer.vocab_size, tokenizer.eos_ids)
    check_vocabulary(tokenizer, compiler.vocabulary)
    allowed = np.flatnonzero(compiler.json_schema(SCHEMAS["enums"]).constraint().allowed())
    assert allowed.size and all(tokenizer.token_bytes(int(i)).startswith(b"{")
                                for i in allowed)


def test_rollback_restores_the_masks(embedded):
    _, tokenizer, compiler = embedded
    constraint = compiler.json_schema({"type": "array", "items": {"type": "integer"},
                                       "maxItems": 2}).constraint()
    masks = [constraint.allowed()]
    for token in tokenizer.encode("[1, 2]"):
        constraint.advance(token)
        masks.append(constraint.allowed())
    assert constraint.is_terminated() and np.flatnonzero(masks[-1]).tolist() == [2]
    constraint.advance(2)  # eos after completion, then rolled back with the last tokens
    with pytest.raises(GrammarError, match="after the end"):
        constraint.advance(tokenizer.encode("1")[0])
    constraint.rollback(1)
    assert constraint.is_terminated()
    constraint.rollback(3)
    assert not constraint.is_terminated()
    assert np.array_equal(constraint.allowed(), masks[-4])
    with pytest.raises(GrammarError, match="cannot roll back"):
        constraint.rollback(99)


def test_grammars_are_compiled_once_in_a_bounded_cache(embedded):
    _, _, compiler = embedded
    small = GrammarCompiler(compiler.vocabulary, cache_size=2)
    first = small.json_schema(SCHEMAS["enums"])
    assert small.json_schema(json.loads(json.dumps(SCHEMAS["enums"]))) is first
    small.regex("a+")
    small.regex("b+")
    assert len(small.cache) == 2 and small.json_schema(SCHEMAS["enums"]) is not first
    reordered = dict(reversed(list(SCHEMAS["enums"].items())))  # key order is part of the key
    assert small.json_schema(reordered) is not small.json_schema(SCHEMAS["enums"])


class AllowOnly:
    """A constraint allowing a fixed set of tokens (the Sampler's side of the interface)."""

    def __init__(self, allowed):
        self.allowed, self.taken = list(allowed), []

    def mask(self, row):
        masked = np.full_like(row, -np.inf)
        masked[self.allowed] = row[self.allowed]
        return masked

    def advance(self, token):
        self.taken.append(token)


def test_the_sampler_masks_first_and_advances_with_the_sampled_token():
    """The mask comes before top-k (top_k=1 would otherwise keep only the disallowed best
    token) and before the repetition penalty; the constraint sees each sampled token."""
    logits = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    for params in (SamplingParams(temperature=1.0, top_k=1, seed=0), SamplingParams(),
                   SamplingParams(temperature=0.7, top_p=0.5, min_p=0.5,
                                  repetition_penalty=2.0, seed=1)):
        constraint = AllowOnly([2, 4])
        sampler = Sampler(params, constraint)
        tokens = [int(sampler(logits, [[2]])[0]) for _ in range(5)]
        assert set(tokens) <= {2, 4} and constraint.taken == tokens
    with pytest.raises(SamplingError, match="one sequence"):
        Sampler(SamplingParams(), AllowOnly([1]))(np.zeros((2, 5), np.float32))


def test_constrained_decoding_runs_without_torch_on_onnx_and_mlx():
    from test_onnx import run_blocked

    run_blocked(("torch", "transformers"), f"""
        import json
        from plt_port import family
        from plt_port.tokenizer import Tokenizer
        from runtimes.backends import load_backend
        from runtimes.generate import generate
        from runtimes.grammar import model_compiler
        model_dir = family.default_model_dir()
        tokenizer = Tokenizer.from_dir(model_dir)
        for name in ("onnx", "mlx"):
            backend = load_backend(name, model_dir)
            grammar = model_compiler(tokenizer, backend).json_schema({SCHEMAS["enums"]!r})
            text, last = generate(backend, tokenizer, {PROMPT!r}, max_new_tokens=48,
                                  grammar=grammar)
            assert last.finish_reason == "stop" and json.loads(text)["version"] == 3, text
    """)
