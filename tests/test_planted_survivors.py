"""Tests for the one-line bugs planted for issue 26 that the fast suite let through
(docs/planted_bugs_26.md has the table): each test names its plant and fails with it in.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from conftest import ConstantBackend, requires
from plt_port.tokenizer import Tokenizer
from runtimes.engine import BatchEngine, Request, RunningBatch, RunningSequence, TokenEvent
from runtimes.sampling import Sampler, SamplingParams
from runtimes.sequence import SequenceText


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def events_of(events: queue.Queue) -> list[TokenEvent]:
    got = [events.get(timeout=30)]
    while isinstance(got[-1], TokenEvent) and got[-1].finish_reason is None:
        got.append(events.get(timeout=30))
    assert isinstance(got[-1], TokenEvent), got[-1]
    return got


# ---- the engine ----------------------------------------------------------------------------
def test_a_batch_narrows_when_exactly_half_its_width_would_do(make_model, tokenizer_dir):
    """E2: 4 sequences in a batch 4 wide, two leave: 2 rows would do, the batch is 2 wide
    (and 1 wide once one more leaves)."""
    backend = ConstantBackend(make_model("plt"))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    batch = RunningBatch(backend, max_batch=8)
    for k in range(4):
        prompt = [3 + k, 4]
        state, _ = backend.prefill([prompt], 8)
        batch.add(RunningSequence(Request(prompt, 4, print), SequenceText(tokenizer, prompt, 4),
                                  Sampler(), 8, 5), state)
    assert batch.state.batch_size == 4
    batch.release([0, 1])
    assert batch.state.batch_size == 2 and len(batch.sequences) == 2
    batch.release([1])
    assert batch.state.batch_size == 1


def test_decode_time_adds_up_every_step(make_model):
    """E6: stats.decode_s sums the sequence's steps; each step of this fake sleeps call_s, so
    19 steps take at least 19 call_s (a lower bound: sleeps never end early)."""
    model_dir = make_model()
    engine = BatchEngine(lambda loops: ConstantBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=2).start()
    try:
        events = queue.Queue()
        engine.submit(Request([1, 2, 3], 20, events.put))
        got = events_of(events)
    finally:
        engine.close()
    assert len(got) == 20
    assert got[-1].stats.decode_s >= 19 * ConstantBackend.call_s


def test_time_to_first_token_is_measured_from_the_prefill(make_model):
    """E9: ttft_s covers the prefill and the first sampling: at least prefill_s, at most the
    time from submitting to receiving the first token."""
    model_dir = make_model()
    engine = BatchEngine(lambda loops: ConstantBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=2).start()
    try:
        events = queue.Queue()
        submitted = time.perf_counter()
        engine.submit(Request([1, 2, 3], 3, events.put))
        first = events.get(timeout=30)
        received = time.perf_counter()
        if first.finish_reason is None:
            events_of(events)
    finally:
        engine.close()
    stats = first.stats
    assert stats.prefill_s <= stats.ttft_s <= received - submitted


class CountingBackend(ConstantBackend):
    prefills = 0

    def prefill_chunk(self, caches, ids, start, num_new):
        CountingBackend.prefills += 1
        return super().prefill_chunk(caches, ids, start, num_new)


def test_a_request_cancelled_while_waiting_is_never_prefilled(make_model):
    """E10: with one slot busy, a waiting request is cancelled; once the slot frees, the
    engine skips it (no prefill, no event) instead of admitting it."""
    model_dir = make_model()
    CountingBackend.prefills = 0
    engine = BatchEngine(lambda loops: CountingBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=1).start()
    try:
        running, waiting_events = Request([1, 2], 400, queue.Queue().put), queue.Queue()
        engine.submit(running)
        wait_for(lambda: engine.running_count == 1)
        waiting = Request([3, 4], 5, waiting_events.put)
        engine.submit(waiting)
        waiting.cancel()
        running.cancel()
        wait_for(lambda: engine.idle)
        later = queue.Queue()
        engine.submit(Request([5, 6], 2, later.put))
        assert len(events_of(later)) == 2
    finally:
        engine.close()
    assert CountingBackend.prefills == 2  # the running request and the later one
    assert waiting_events.empty() or isinstance(waiting_events.get(), Exception)


# ---- the server ----------------------------------------------------------------------------
@requires("fastapi")
@requires("httpx")
def test_anthropic_usage_splits_the_prompt_into_prefilled_and_cached(make_model):
    """S3: a repeated /v1/messages prompt reads part of itself from the prompt cache:
    input_tokens + cache_read_input_tokens is the prompt (count_tokens), not more."""
    import httpx

    from plt_port.app.commands.serve import open_server, start_in_thread
    from runtimes.prompt_cache import PromptCache

    engine, app = open_server(make_model(), "torch", prompt_cache=PromptCache())
    server, thread, url = start_in_thread(app)
    body = {"model": "model-plt-0", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "def read(path):\n    with open(path)"}]}
    try:
        with httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
            name = client.get("/models").json()["data"][0]["id"]
            body["model"] = name
            prompt = client.post("/messages/count_tokens", json={
                "model": name, "messages": body["messages"]}).json()["input_tokens"]
            usages = [client.post("/messages", json=body).json()["usage"] for _ in range(2)]
    finally:
        server.should_exit = True
        thread.join(15)
        engine.close()
    assert usages[0]["input_tokens"] == prompt and usages[0]["cache_read_input_tokens"] == 0
    assert usages[1]["cache_read_input_tokens"] > 0
    assert usages[1]["input_tokens"] + usages[1]["cache_read_input_tokens"] == prompt


@pytest.fixture(scope="module")
def http(tmp_path_factory, tokenizer_dir):
    """An httpx client of a server on a tiny random model (torch, batches of up to 4)."""
    import httpx

    from conftest import LOUD_STD, tiny_config
    from plt_port.app.commands.serve import open_server, start_in_thread
    from plt_port.random_model import save_random_model

    model_dir = save_random_model(tmp_path_factory.mktemp("survivors") / "model",
                                  tiny_config("plt"), 0, tokenizer_dir=tokenizer_dir,
                                  std=LOUD_STD)
    engine, app = open_server(model_dir, "torch", max_batch=4)
    server, thread, url = start_in_thread(app)
    with httpx.Client(base_url=url, timeout=60) as client:
        client.engine = engine
        yield client
    server.should_exit = True
    thread.join(15)
    engine.close()


def metric(http, name: str) -> float:
    import re

    return float(re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M).group(1))


@requires("fastapi")
@requires("httpx")
def test_prompt_token_metric_counts_every_prompt_token(http):
    """S5: plt_prompt_tokens_total grows by the prompts' tokens (usage.prompt_tokens)."""
    before = metric(http, "plt_prompt_tokens_total")
    used = [http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
            ["usage"]["prompt_tokens"] for prompt in ([5, 6, 7], "def f(x):\n    return x")]
    assert metric(http, "plt_prompt_tokens_total") - before == sum(used)


@requires("fastapi")
@requires("httpx")
def test_streamed_echo_starts_with_the_prompt(http):
    """S6: echo: true streams the prompt's text first, as the whole response does."""
    import json

    body = {"prompt": "def add(a, b):\n", "max_tokens": 4, "temperature": 0, "echo": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stream = http.post("/v1/completions", json=body | {"stream": True}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines()
              if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert whole.startswith(body["prompt"]) and streamed == whole


@requires("fastapi")
@requires("httpx")
def test_text_offsets_are_where_each_token_text_starts(http):
    """S7: logprobs.text_offset[i] is the length of the text before token i (after the
    echoed prompt), streamed chunk by chunk and in the whole response alike."""
    import json

    body = {"prompt": "class Stack:\n    def push(self", "max_tokens": 6, "temperature": 0,
            "logprobs": 1, "echo": False}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    stream = http.post("/v1/completions", json=body | {"stream": True}).text
    chunks = [json.loads(line[6:])["choices"][0] for line in stream.splitlines()
              if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    texts = [c["text"] for c in chunks]
    starts = [sum(map(len, texts[:i])) for i in range(len(texts))]
    assert [c["logprobs"]["text_offset"][0] for c in chunks] == starts
    assert whole["logprobs"]["text_offset"] == starts and whole["text"] == "".join(texts)
    echoed = http.post("/v1/completions", json=body | {"echo": True, "logprobs": None}).json()
    assert echoed["choices"][0]["text"].startswith(body["prompt"])


@requires("fastapi")
@requires("httpx")
def test_a_completion_without_max_tokens_gets_openais_16(http):
    """S8: /v1/completions' default max_tokens is OpenAI's 16 (eos suppressed so the greedy
    answer runs to its limit)."""
    done = http.post("/v1/completions", json={"prompt": [5, 6, 7], "temperature": 0,
                                              "logit_bias": {"2": -100}}).json()
    assert (done["usage"]["completion_tokens"], done["choices"][0]["finish_reason"]) == \
        (16, "length")


@requires("fastapi")
@requires("httpx")
def test_health_is_503_once_the_engine_has_stopped(make_model):
    """S12: /health answers 200 while the engine runs, 503 with status "stopped" after."""
    import httpx

    from plt_port.app.commands.serve import open_server, start_in_thread

    engine, app = open_server(make_model(), "torch")
    server, thread, url = start_in_thread(app)
    try:
        up = httpx.get(f"{url}/health", timeout=30)
        engine.close()
        down = httpx.get(f"{url}/health", timeout=30)
    finally:
        server.should_exit = True
        thread.join(15)
        engine.close()
    assert (up.status_code, up.json()["status"]) == (200, "ok")
    assert (down.status_code, down.json()["status"]) == (503, "stopped")


@requires("fastapi")
@requires("httpx")
def test_anthropic_honours_every_stop_sequence(http):
    """S13: the second of two stop_sequences ends the message (stop_reason stop_sequence,
    stop_sequence the one matched) like the first would."""
    messages = [{"role": "user", "content": "def fib(n):\n    "}]
    body = {"model": http.get("/v1/models").json()["data"][0]["id"], "messages": messages,
            "max_tokens": 16, "temperature": 0, "logit_bias": {"2": -100}}
    full = http.post("/v1/messages", json=body).json()["content"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = http.post("/v1/messages", json=body | {"stop_sequences": ["\x00never", stop]}).json()
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("stop_sequence", stop)
    assert cut["content"][0]["text"] == full[:full.index(stop)]


# ---- tool-call and reasoning parsers -------------------------------------------------------
def test_qwen3_coder_enum_parameters_stay_strings():
    """T3: a parameter the schema types "enum" (vLLM's string-like types) keeps its text, even
    when it reads as JSON; "integer" is parsed."""
    from plt_port.app.tool_parsers import Qwen3CoderFormat, parse_tool_calls

    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"level": {"type": "enum"}, "n": {"type": "integer"}}}}}]
    text = ("<tool_call>\n<function=pick>\n<parameter=level>\n10\n</parameter>\n"
            "<parameter=n>\n10\n</parameter>\n</function>\n</tool_call>")
    _, calls = parse_tool_calls(text, Qwen3CoderFormat(tools))
    assert [c.arguments for c in calls] == ['{"level": "10", "n": 10}']


def test_a_hermes_body_with_other_keys_is_not_a_call():
    """T4: Hermes bodies are {"name", "arguments"}; another key makes it text (kept whole)."""
    from plt_port.app.tool_parsers import HermesFormat, parse_tool_calls

    text = '<tool_call>{"name": "f", "arguments": {}, "extra": 1}</tool_call>'
    assert parse_tool_calls(text, HermesFormat()) == (text, [])
    ok = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert [c.arguments for c in parse_tool_calls(ok, HermesFormat())[1]] == ['{"a": 1}']



# ---- grammars ------------------------------------------------------------------------------
def test_strict_mode_leaves_an_object_with_pattern_properties_open():
    """G3: OpenAI's strict mode closes objects that say nothing about other properties; one
    with patternProperties allows the keys they match, so it is left as it is."""
    from runtimes.grammar import closed_objects

    open_keys = {"type": "object", "properties": {"a": {"type": "integer"}},
                 "patternProperties": {"^x_": {"type": "string"}}}
    nested = {"type": "object", "properties": {"inner": open_keys,
                                               "plain": {"type": "object", "properties": {}}}}
    closed = closed_objects(nested)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["plain"]["additionalProperties"] is False
    assert closed["properties"]["inner"] == open_keys


# ---- the prompt cache and rewinds ----------------------------------------------------------
def prefill_counter(backend, monkeypatch) -> list[int]:
    """Tokens every later prefill chunk of `backend` runs (a list of one counter)."""
    count, chunk = [0], backend.prefill_chunk

    def counted(caches, ids, start, num_new, trace=False):
        count[0] += int(num_new.max())
        return chunk(caches, ids, start, num_new, trace=trace)

    monkeypatch.setattr(backend, "prefill_chunk", counted)
    return count


def test_prompt_cache_hit_tokens_are_the_tokens_not_prefilled(make_model, monkeypatch):
    """P2: an entry of 600 tokens (journal: its last 256; snapshots at 256 and 512) and a
    prompt sharing its first 300: the rewind restores the snapshot at 256 and prefills the
    rest, so 256 tokens are reused; hit_tokens counts those, not the 300 shared."""
    from conftest import random_prompts
    from runtimes.backends import load_backend
    from runtimes.prompt_cache import PromptCache, history_policy

    backend = load_backend("torch", make_model("plt", max_position_embeddings=1024), loops=2)
    tokens = random_prompts([600], seed=8)[0]
    cache = PromptCache(max_entries=2)
    state, _ = backend.prefill([tokens], 608, history=history_policy(backend))
    cache.insert(backend, state)
    prompt = tokens[:300] + random_prompts([20], seed=9)[0]
    prefilled = prefill_counter(backend, monkeypatch)
    _, _, reused = cache.start(backend, prompt, 336)
    assert reused == 256 and prefilled[0] == len(prompt) - 256
    assert (cache.stats.hits, cache.stats.hit_tokens, cache.stats.queried_tokens) == \
        (1, 256, len(prompt))


@pytest.fixture
def rewind_backend(tmp_path, tokenizer_dir):
    from conftest import LOUD_STD, tiny_config
    from plt_port.random_model import save_random_model
    from runtimes.backends import load_backend

    model_dir = save_random_model(tmp_path / "rewind", tiny_config("plt"), 0,
                                  tokenizer_dir=tokenizer_dir, std=LOUD_STD)
    return load_backend("torch", model_dir, loops=3)


TOKENS = list(range(10, 50))


def test_a_rewind_to_a_snapshot_keeps_that_snapshot(rewind_backend, monkeypatch):
    """P4: rewinding to 8, a snapshot position, keeps the snapshot at 8: a later rewind to 9
    prefills 1 token from it, not 5 from the one at 4."""
    from runtimes.backends.history import HistoryPolicy

    backend = rewind_backend
    state, _ = backend.prefill([TOKENS[:30]], 64, history=HistoryPolicy(snapshot_every=4))
    backend.rewind(state, 0, 8)
    backend.extend(state, TOKENS[8:20])
    prefilled = prefill_counter(backend, monkeypatch)
    backend.rewind(state, 0, 9)
    assert prefilled[0] == 1


def test_the_journal_reaches_back_exactly_its_depth(rewind_backend, monkeypatch):
    """P5, P6: a journal of depth 6 after a prefill of 30 holds positions 24..29; a rewind
    to 24, its first position, is an undo (nothing prefilled again) equal to a cold prefill."""
    from runtimes.backends.history import HistoryPolicy

    backend = rewind_backend
    state, _ = backend.prefill([TOKENS[:30]], 64, history=HistoryPolicy(depth=6))
    assert state.history.slots[0].journal_start == 24
    prefilled = prefill_counter(backend, monkeypatch)
    backend.rewind(state, 0, 24)
    assert prefilled[0] == 0
    cold, _ = backend.prefill([TOKENS[:24]], 64)
    np.testing.assert_allclose(backend.extend(state, TOKENS[24:27]),
                               backend.extend(cold, TOKENS[24:27]), atol=1e-5, rtol=0)


def test_a_rewind_into_a_record_keeps_its_first_positions(rewind_backend, monkeypatch):
    """P7: a rewind to one position past a record's start keeps that record's first position
    in the journal, so a later rewind to the record's start is still an undo."""
    from runtimes.backends.history import HistoryPolicy

    backend = rewind_backend
    state, _ = backend.prefill([TOKENS[:30]], 64, chunk_size=7, history=HistoryPolicy(depth=64))
    record = next(r for r in state.history.slots[0].journal if r.start > 0 and r.count >= 2)
    backend.rewind(state, 0, record.start + 1)
    backend.extend(state, TOKENS[record.start + 1:record.start + 4])
    prefilled = prefill_counter(backend, monkeypatch)
    backend.rewind(state, 0, record.start)
    assert prefilled[0] == 0


# ---- KV quantization -----------------------------------------------------------------------
def test_quantized_kv_start_quantizes_at_exactly_start_tokens(make_model):
    """K1: mlx-lm's quantized_kv_start: a call that leaves a sequence with >= start tokens
    quantizes; 19 tokens of a start of 20 stay dense, the step to 20 quantizes, and so does
    a prefill of exactly 20."""
    from conftest import random_prompts
    from runtimes.backends import load_backend

    backend = load_backend("torch", make_model("plt", head_dim=32, plt_window_size=[15, 0]),
                           loops=2, kv_bits=8, kv_group_size=32, quantized_kv_start=20)
    prompt = random_prompts([20], seed=10)[0]
    state, logits = backend.prefill([prompt[:19]], 32)
    assert not backend.global_quantized(state.caches)
    backend.step(state, logits.argmax(-1))
    assert backend.global_quantized(state.caches)
    exact, _ = backend.prefill([prompt], 32)
    assert backend.global_quantized(exact.caches)
    assert backend.cache_bytes(exact) == backend.expected_cache_bytes(1, 32, 4)


# ---- stop strings (runtimes/sequence.py, Knuth-Morris-Pratt) --------------------------------
def brute_prefix_function(pattern: str) -> list[int]:
    """The longest proper prefix of each pattern[:i + 1] that is also its suffix, by trying
    every length."""
    return [max(k for k in range(i + 1) if pattern[:k] == pattern[i + 1 - k:i + 1])
            for i in range(len(pattern))]


def test_the_prefix_function_is_the_brute_force_one_on_every_short_pattern():
    """X15: every pattern of up to 8 letters over "ab" (those need KMP's repeated fallbacks,
    e.g. "aaab")."""
    import itertools

    from runtimes.sequence import prefix_function

    for n in range(1, 9):
        for letters in itertools.product("ab", repeat=n):
            pattern = "".join(letters)
            assert list(prefix_function(pattern)) == brute_prefix_function(pattern), pattern


def test_stop_matcher_is_str_find_on_random_texts_and_splits():
    """X16 (X17 fails it too): 400 seeded texts over a 2-3 letter alphabet, 1-4 stop strings
    each, cut into random tokens: the streamed text is the reference's (str.find on the
    whole text: cut before the stop string that ends first, the longest of those ending
    there)."""
    import random

    from test_server_reliability import first_stop, streamed

    from runtimes.sequence import StopMatcher

    rng = random.Random(26)
    for case in range(400):
        alphabet = "ab" if case % 2 else "abc"
        word = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
        text = word(rng.randint(1, 24))
        stop = [word(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) \
            if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(StopMatcher(stop), pieces) == first_stop(text, stop), (text, stop, pieces)


# ---- speculative decoding ------------------------------------------------------------------
def test_speculative_num_tokens_and_ngram_size_at_their_bounds():
    """X9: num_tokens 1 and MAX_NUM_TOKENS are taken, 0 and MAX_NUM_TOKENS + 1 refused;
    ngram_size 1 is taken, 0 refused."""
    from runtimes.speculative import MAX_NUM_TOKENS, SpeculativeConfig, SpeculativeError

    for num_tokens in (1, MAX_NUM_TOKENS):
        assert SpeculativeConfig("ngram", num_tokens, 1).num_tokens == num_tokens
    for num_tokens, ngram_size in ((0, 3), (MAX_NUM_TOKENS + 1, 3), (4, 0)):
        with pytest.raises(SpeculativeError, match="must be an integer in 1.."):
            SpeculativeConfig("ngram", num_tokens, ngram_size)


def scripted_run(make_model, max_new_tokens, k=4, max_drafts=None, **config):
    """(plain tokens, speculative tokens, the last event's SpeculativeStats) of a greedy
    request whose drafts are all right (at most `max_drafts` a proposal)."""
    from test_speculative import GREEDY, REPETITIVE, ScriptedProposer, speculation_with, tokens_of

    from runtimes.backends import load_backend

    model_dir = make_model("plt", **config)
    backend, tokenizer = load_backend("torch", model_dir, loops=2), Tokenizer.from_dir(model_dir)
    options = dict(max_new_tokens=max_new_tokens, sampling=GREEDY)
    plain, _ = tokens_of(backend, tokenizer, REPETITIVE, **options)
    proposer = ScriptedProposer(REPETITIVE, plain, None)
    if max_drafts is not None:
        propose = proposer.propose
        proposer.propose = lambda context, n: propose(context, n)[:max_drafts]
    got, last = tokens_of(backend, tokenizer, REPETITIVE, speculation_with(proposer, k),
                          **options)
    return plain, got, last.speculative


def test_one_verify_gives_k_plus_two_tokens_when_every_draft_is_right(make_model):
    """X11: with k = 4 right drafts and max_new_tokens = k + 2, the first verify drafts all
    4 (the drafts stop exactly two short of the limit) and yields every token: the verified
    last token, 4 accepted drafts and the bonus."""
    plain, got, stats = scripted_run(make_model, 6)
    assert got == plain
    assert (stats.verifies, stats.drafted, stats.accepted) == (1, 4, 4)


def test_drafted_counts_the_drafts_proposed_not_the_drafts_asked_for(make_model):
    """X12: a proposer giving 2 drafts where 4 are asked for: drafted is 2 a verify."""
    plain, got, stats = scripted_run(make_model, 20, max_drafts=2)
    assert got == plain and stats.verifies > 1
    assert stats.drafted == stats.accepted == 2 * stats.verifies


def test_speculation_fills_the_context_exactly(make_model):
    """X13: a request of exactly the context's positions (prompt + max_new_tokens - 1 ==
    max_position_embeddings), drafts all right: the last verify ends at the context's last
    position and the tokens are plain decoding's."""
    from test_speculative import REPETITIVE

    context = 64
    plain, got, stats = scripted_run(make_model, context - len(REPETITIVE) + 1,
                                     max_position_embeddings=context)
    assert got == plain and len(got) == context - len(REPETITIVE) + 1 and stats.verifies > 0


# ---- the server's shutdown -------------------------------------------------------------------
def test_stopping_generations_ends_a_stream_in_flight_and_refuses_new_ones():
    """X22 (in the fast suite; the slow signal test covers it end to end): stop_generations,
    which uvicorn's shutdown calls first, gives a stream in flight one "shutting down" error
    event and its [DONE]; a request after it is a 503."""
    import threading

    from test_server_reliability import Running, read_stream

    running = Running()
    try:
        port = int(running.url.rsplit(":", 1)[1])
        started, seen = threading.Event(), []
        body = {"prompt": "def f", "max_tokens": 2000, "temperature": 0, "stream": True}
        reader = threading.Thread(target=read_stream,
                                  args=(port, "/v1/completions", body, started, seen))
        reader.start()
        assert started.wait(timeout=60)
        running.app.state.service.stop_generations()
        reader.join(30)
        assert not reader.is_alive()
        later = running.post("/v1/completions", {"prompt": "def f", "max_tokens": 1})
    finally:
        running.stop()
    assert [line for line in seen if line][-1] == "data: [DONE]", seen[-4:]
    errors = [line for line in seen if line.startswith('data: {"error"')]
    assert len(errors) == 1 and "shutting down" in errors[0]
    assert later.status_code == 503


def test_the_draft_model_feeds_only_the_tokens_it_lacks(make_model):
    """X8, X27: after proposing k drafts for a context, the draft state holds the context and
    k - 1 drafts. The next context (one draft accepted, then the correction) rewinds to the
    accepted draft and feeds the correction alone; a context shorter than what the state holds
    rewinds to before its last token and feeds that one (the logits after it are needed);
    with k = 1 the state holds exactly the context, and the same context again feeds nothing.
    Every proposal is the cold one."""
    from test_speculative import REPETITIVE

    from runtimes.backends import load_backend
    from runtimes.speculative import DraftModelProposer

    backend = load_backend("torch", make_model("plt"), loops=2)
    proposer = DraftModelProposer(backend, 4)
    fed = []
    extend, step = backend.extend, backend.step
    backend.extend = lambda state, tokens: fed.append(list(tokens)) or extend(state, tokens)
    backend.step = lambda state, tokens: fed.append(tokens.tolist()) or step(state, tokens)

    def cold(context):
        state, logits = backend.prefill([context], len(context) + 8)
        drafts = []
        for _ in range(4):
            drafts.append(int(logits[0].argmax()))
            logits = step(state, np.array(drafts[-1:]))
        return drafts

    context = list(REPETITIVE)
    drafts = proposer.propose(context, 4)
    assert drafts == cold(context) and fed == [[d] for d in drafts[:3]]
    correction = (drafts[1] + 1) % 512
    fed.clear()
    following = context + [drafts[0], correction]
    assert proposer.propose(following, 4) == cold(following)
    assert fed[0] == [correction] and len(fed) == 4
    fed.clear()
    shorter = following[:-1]
    assert proposer.propose(shorter, 4) == cold(shorter) and fed[0] == [drafts[0]]
    one = DraftModelProposer(backend, 1)
    assert one.propose(context, 1) == cold(context)[:1]
    fed.clear()
    assert one.propose(context, 1) == cold(context)[:1] and fed == []


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("backend_name", ["torch", "onnx", "mlx"])
def test_verify_rows_are_decode_steps_one_past_the_capacity_too(make_model, backend_name, drafts):
    """X24 (and X14, X25, caught before by the onnx greedy test): every backend's verify
    of the last token and 1 or 2 drafts, from a state of capacity P + 2 (2 drafts need
    P + 3 positions: the cache grows first), gives the logits of as many decode steps
    (fp32, CLP at L = 2), one row each."""
    from test_speculative import RANDOM

    from runtimes.backends import backend_unavailable_reason, load_backend

    if reason := backend_unavailable_reason(backend_name):
        pytest.skip(reason)
    backend = load_backend(backend_name, make_model("plt"), loops=2)
    tokens = [7, 8, 9][:drafts + 1]
    state, _ = backend.prefill([RANDOM], len(RANDOM) + 2)
    rows = backend.verify(state, tokens)
    assert state.capacity >= len(RANDOM) + len(tokens)
    assert int(state.lengths[0]) == len(RANDOM) + len(tokens)
    plain, _ = backend.prefill([RANDOM], len(RANDOM) + 8)
    steps = [backend.step(plain, np.array([t]))[0] for t in tokens]
    assert rows.shape == (len(tokens), backend.config.vocab_size)
    np.testing.assert_allclose(rows, np.stack(steps), atol=1e-4, rtol=1e-4)


def test_an_empty_stop_string_stops_nothing():
    """X26: "" among the stop strings is ignored (it would match everywhere)."""
    from test_server_reliability import streamed

    from runtimes.sequence import StopMatcher

    assert streamed(StopMatcher(["", "ab"]), ["xa", "b", "c"]) == ("x", True)
    assert streamed(StopMatcher([""]), ["xyz", "w"]) == ("xyzw", False)
