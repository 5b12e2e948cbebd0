"""Every limit exactly at its boundary: `== max` passes and `max + 1` fails (and the same at
the lower end), where the other tests try values far past it. Through the server (both APIs),
the engine, the generate API, the backend contract, the config, the sampler, the prompt
cache, chat templates, the corpus and the demo's inputs.
"""

from __future__ import annotations

import os
import queue

import numpy as np
import pytest

from conftest import ConstantBackend, random_prompts, requires

CONTEXT, VOCAB, MAX_BATCH = 64, 512, 4


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tokenizer_dir):
    from conftest import LOUD_STD, tiny_config
    from plt_port.random_model import save_random_model

    return save_random_model(tmp_path_factory.mktemp("bounds") / "model",
                             tiny_config("plt", max_position_embeddings=CONTEXT), 0,
                             tokenizer_dir=tokenizer_dir, std=LOUD_STD)


# ---- the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(small_model):
    import httpx

    from plt_port.app.commands.serve import open_server, start_in_thread

    engine, app = open_server(small_model, "torch", max_batch=MAX_BATCH)
    server, thread, url = start_in_thread(app)
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as http:
        yield http
    server.should_exit = True
    thread.join(15)
    engine.close()


def completion(client, **fields):
    return client.post("/completions", json={"prompt": [5, 6, 7], "max_tokens": 2,
                                             "temperature": 0, **fields})


def chat(client, **fields):
    return client.post("/chat/completions", json={
        "messages": [{"role": "user", "content": "x = 1"}], "max_tokens": 2, "temperature": 0,
        **fields})


def message(client, **fields):
    return client.post("/messages", json={
        "model": "model", "messages": [{"role": "user", "content": "x = 1"}], "max_tokens": 2,
        **fields})


def assert_ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def assert_refused(response, param: str) -> None:
    """A 400 naming `param` (as the error's param, or in its message)."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or param in error["message"], error


@requires("fastapi")
def test_completion_logprobs_5_and_6(client):
    body = assert_ok(completion(client, logprobs=5))  # keyed by text: tokens may share one
    assert all(1 <= len(top) <= 5 for top in body["choices"][0]["logprobs"]["top_logprobs"])
    assert_ok(completion(client, logprobs=0))
    assert_refused(completion(client, logprobs=6), "logprobs")
    assert_refused(completion(client, logprobs=-1), "logprobs")


@requires("fastapi")
def test_chat_top_logprobs_20_and_21(client):
    body = assert_ok(chat(client, logprobs=True, top_logprobs=20))
    content = body["choices"][0]["logprobs"]["content"]
    assert all(len(entry["top_logprobs"]) == 20 for entry in content)
    assert_refused(chat(client, logprobs=True, top_logprobs=21), "top_logprobs")
    assert_refused(chat(client, logprobs=True, top_logprobs=-1), "top_logprobs")


@requires("fastapi")
def test_16_stop_strings_and_17(client):
    stops = [f"\x00never{i}" for i in range(17)]
    assert_ok(completion(client, stop=stops[:16]))
    assert_ok(chat(client, stop=stops[:16]))
    assert_ok(message(client, stop_sequences=stops[:16]))
    assert_refused(completion(client, stop=stops), "stop")
    assert_refused(chat(client, stop=stops), "stop")
    response = message(client, stop_sequences=stops)
    assert response.status_code == 400 and "16" in response.text, response.text


@requires("fastapi")
def test_n_equal_to_max_batch_and_one_more(client):
    body = assert_ok(completion(client, n=MAX_BATCH, temperature=1.0, seed=1))
    assert sorted(c["index"] for c in body["choices"]) == list(range(MAX_BATCH))
    assert_ok(chat(client, n=MAX_BATCH))
    assert_refused(completion(client, n=MAX_BATCH + 1), "n")
    assert_refused(chat(client, n=MAX_BATCH + 1), "n")
    assert_ok(completion(client, n=1))
    assert_refused(completion(client, n=0), "n")  # was silently 1 (`body.n or 1`)
    assert_refused(chat(client, n=0), "n")


@requires("fastapi")
def test_max_tokens_1_and_0(client):
    assert assert_ok(completion(client, max_tokens=1))["usage"]["completion_tokens"] == 1
    assert assert_ok(chat(client, max_completion_tokens=1))["usage"]["completion_tokens"] == 1
    assert assert_ok(message(client, max_tokens=1))["usage"]["output_tokens"] == 1
    assert_refused(completion(client, max_tokens=0), "max_tokens")
    assert_refused(chat(client, max_completion_tokens=0), "max_completion_tokens")
    assert message(client, max_tokens=0).status_code == 400


@requires("fastapi")
def test_prompt_and_answer_exactly_filling_the_context(client):
    """P + N - 1 = context positions run (P = 60, N = 5); N = 6 is a 400 naming the context;
    a prompt of the whole context with N = 1 runs, one more token of prompt does not."""
    prompt = random_prompts([CONTEXT - 4], seed=1)[0]
    body = assert_ok(completion(client, prompt=prompt, max_tokens=5, logit_bias={"2": -100}))
    assert body["usage"] == {"prompt_tokens": 60, "completion_tokens": 5, "total_tokens": 65,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    refused = completion(client, prompt=prompt, max_tokens=6)
    assert refused.status_code == 400 and \
        refused.json()["error"]["code"] == "context_length_exceeded", refused.text
    whole = random_prompts([CONTEXT + 1], seed=2)[0]
    assert_ok(completion(client, prompt=whole[:CONTEXT], max_tokens=1))
    assert completion(client, prompt=whole, max_tokens=1).status_code == 400
    assert message(client, max_tokens=CONTEXT * 2).status_code == 400


@requires("fastapi")
def test_token_ids_and_logit_bias_at_the_vocabulary_edge(client, small_model):
    """The last token id is a prompt token and a logit_bias key (and is then what is
    sampled); the vocabulary size is neither."""
    from plt_port.tokenizer import Tokenizer

    assert_ok(completion(client, prompt=[VOCAB - 1, 0]))
    assert completion(client, prompt=[VOCAB]).status_code == 400
    forced = assert_ok(chat(client, logit_bias={str(VOCAB - 1): 100}, max_tokens=1,
                            logprobs=True))
    last = list(Tokenizer.from_dir(small_model).token_bytes(VOCAB - 1))
    assert forced["choices"][0]["logprobs"]["content"][0]["bytes"] == last
    past = completion(client, logit_bias={str(VOCAB): 1})  # refused by the route, by name
    assert past.status_code == 400 and past.json()["error"]["param"] == "logit_bias", past.text
    assert_ok(completion(client, logit_bias={"5": -100}))
    assert_refused(completion(client, logit_bias={"5": 100.001}), "logit_bias")
    assert_refused(completion(client, logit_bias={"5": -100.001}), "logit_bias")


@requires("fastapi")
def test_loops_8_and_9(client):
    body = assert_ok(completion(client, loops=8, max_tokens=1))
    assert body["model"] == "model@loops=8"
    assert_ok(completion(client, model="model@loops=8", max_tokens=1))
    assert_ok(completion(client, loops=1, max_tokens=1))
    assert completion(client, loops=9).status_code == 400
    assert completion(client, loops=0).status_code == 400
    assert completion(client, model="model@loops=9").status_code == 404


@requires("fastapi")
@pytest.mark.parametrize("field,ok,bad", [
    ("presence_penalty", 2.0, 2.001), ("presence_penalty", -2.0, -2.001),
    ("frequency_penalty", 2.0, 2.001), ("frequency_penalty", -2.0, -2.001),
    ("top_p", 1.0, 1.001), ("min_p", 1.0, 1.001), ("min_p", 0.0, -0.001),
    ("temperature", 0.0, -0.001), ("repetition_penalty", 1e-3, 0.0)])
def test_sampling_ranges_at_their_ends(client, field, ok, bad):
    assert_ok(completion(client, **{field: ok}))
    response = completion(client, **{field: bad})
    assert response.status_code == 400 and field in response.text, response.text


# ---- the engine, the generate API and the backend contract ---------------------------------
def test_generate_exactly_at_the_context(small_model):
    from plt_port.tokenizer import Tokenizer
    from runtimes.backends import load_backend
    from runtimes.generate import ContextLengthError, generate
    from runtimes.sampling import SamplingParams

    backend = load_backend("torch", small_model)
    tokenizer = Tokenizer.from_dir(small_model)
    prompt = random_prompts([CONTEXT - 9], seed=3)[0]
    no_eos = SamplingParams(temperature=0, logit_bias={2: -100})
    _, last = generate(backend, tokenizer, prompt, max_new_tokens=10, sampling=no_eos)
    assert (last.generation_tokens, last.finish_reason) == (10, "length")
    with pytest.raises(ContextLengthError, match="need 65 positions"):
        generate(backend, tokenizer, prompt, max_new_tokens=11)
    _, last = generate(backend, tokenizer, random_prompts([CONTEXT])[0], max_new_tokens=1)
    assert last.generation_tokens == 1
    with pytest.raises(ContextLengthError):
        generate(backend, tokenizer, random_prompts([CONTEXT + 1])[0], max_new_tokens=1)


def test_backend_positions_prompts_and_steps_at_their_limits(small_model):
    from runtimes.backends import BackendError, load_backend

    backend = load_backend("torch", small_model)
    with pytest.raises(BackendError, match="65 positions requested"):
        backend.empty_state(1, CONTEXT + 1)
    with pytest.raises(BackendError, match="max_tokens must be a positive integer"):
        backend.empty_state(1, 0)
    prompt = random_prompts([CONTEXT - 1], seed=4)[0]
    with pytest.raises(BackendError, match="more than the 62 positions"):
        backend.prefill([prompt], CONTEXT - 2)
    state, logits = backend.prefill([prompt], CONTEXT - 1)
    backend.step(state, logits.argmax(-1))  # writes the last position: length == context
    assert int(state.lengths[0]) == CONTEXT
    with pytest.raises(BackendError, match="already holds 64 positions"):
        backend.step(state, np.array([3]))
    state, _ = backend.prefill([[VOCAB - 1, 0]], 4)
    backend.step(state, np.array([VOCAB - 1]))
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.step(state, np.array([VOCAB]))
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.prefill([[VOCAB]], 4)
    with pytest.raises(BackendError, match="chunk size must be a positive integer"):
        backend.prefill([prompt], CONTEXT, chunk_size=0)
    backend.prefill([prompt], CONTEXT, chunk_size=1)


def test_threads_1_and_0(small_model):
    from runtimes.backends import BackendError, load_backend

    load_backend("torch", small_model, threads=1)
    with pytest.raises(BackendError, match="threads must be an integer from 1 to"):
        load_backend("torch", small_model, threads=0)


def events_until_done(events: queue.Queue) -> list:
    got = [events.get(timeout=30)]
    while not isinstance(got[-1], BaseException) and got[-1].finish_reason is None:
        got.append(events.get(timeout=30))
    return got


def test_engine_siblings_fill_max_batch_and_one_more(make_model):
    from plt_port.tokenizer import Tokenizer
    from runtimes.engine import BatchEngine, EngineError, Request

    model_dir = make_model()
    engine = BatchEngine(lambda loops: ConstantBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=3).start()
    try:
        queues = [queue.Queue() for _ in range(4)]
        requests = [Request([1, 2], 2, q.put) for q in queues]
        requests[0].siblings = requests[1:3]
        engine.submit(requests[0])
        assert [len(events_until_done(q)) for q in queues[:3]] == [2, 2, 2]
        too_many = Request([1, 2], 2, queue.Queue().put, siblings=requests[1:4])
        with pytest.raises(EngineError, match="4 sequences of one prompt, more than the 3"):
            engine.submit(too_many)
    finally:
        engine.close()


def test_engine_queue_takes_max_queue_and_refuses_one_more(make_model):
    """max_batch 1 running a long request, max_queue 2: two more wait, the third is refused."""
    import time

    from plt_port.tokenizer import Tokenizer
    from runtimes.engine import BatchEngine, EngineError, QueueFullError, Request

    model_dir = make_model()
    with pytest.raises(EngineError, match="max_queue must be >= 1"):
        BatchEngine(lambda loops: ConstantBackend(model_dir, loops), None, max_queue=0)
    engine = BatchEngine(lambda loops: ConstantBackend(model_dir, loops),
                         Tokenizer.from_dir(model_dir), max_batch=1, max_queue=2).start()
    try:
        running = Request([1, 2], 400, queue.Queue().put)
        engine.submit(running)
        deadline = time.monotonic() + 10
        while engine.running_count != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.submit(Request([1], 2, queue.Queue().put))
        engine.submit(Request([1], 2, queue.Queue().put))
        with pytest.raises(QueueFullError):
            engine.submit(Request([1], 2, queue.Queue().put))
        running.cancel()
    finally:
        engine.close()


# ---- the config, the sampler, KV quantization ---------------------------------------------
def test_loop_counts_1_and_8_pass_0_and_9_fail():
    from conftest import tiny_config
    from plt_port.config import MAX_LOOPS, ConfigError, PLTConfig

    assert MAX_LOOPS == 8
    config = tiny_config()
    assert [config.resolve_loops(k) for k in (1, 8)] == [1, 8]
    for bad in (0, 9):
        with pytest.raises(ConfigError, match=r"1\.\.8"):
            config.resolve_loops(bad)
    for fmt, field in (("plt", "plt_num_loops"), ("v1", "loop_num")):
        PLTConfig.from_dict(tiny_config(fmt, **{field: 8}).to_dict())
        for bad in (0, 9):
            with pytest.raises(ConfigError, match=field):
                PLTConfig.from_dict(tiny_config(fmt, **{field: bad}).to_dict())


def test_config_size_bounds_at_their_edges():
    """num_hidden_layers 1..1024 and every dimension 1..2**24 (checked from config.json
    alone: nothing is allocated)."""
    from conftest import tiny_config
    from plt_port.config import MAX_DIM, MAX_LAYERS, ConfigError, PLTConfig

    assert (MAX_LAYERS, MAX_DIM) == (1024, 2 ** 24)
    data = tiny_config().to_dict()
    PLTConfig.from_dict({**data, "num_hidden_layers": MAX_LAYERS})
    PLTConfig.from_dict({**data, "max_position_embeddings": MAX_DIM})
    PLTConfig.from_dict({**data, "vocab_size": MAX_DIM})
    for name, bad in (("num_hidden_layers", MAX_LAYERS + 1), ("num_hidden_layers", 0),
                      ("max_position_embeddings", MAX_DIM + 1), ("vocab_size", MAX_DIM + 1),
                      ("max_position_embeddings", 0)):
        with pytest.raises(ConfigError, match=name):
            PLTConfig.from_dict({**data, name: bad})


def test_sampler_integer_bounds():
    from runtimes.sampling import SamplingError, SamplingParams

    SamplingParams(top_k=0, seed=0, repetition_context_size=1, logit_bias={0: 100, 1: -100})
    for bad in (dict(top_k=-1), dict(seed=-1), dict(repetition_context_size=0),
                dict(logit_bias={-1: 0}), dict(logit_bias={0: 100.5}),
                dict(top_p=0.0)):
        with pytest.raises(SamplingError):
            SamplingParams(**bad)


def test_quantized_kv_start_0_and_minus_1(make_model):
    from runtimes.backends import BackendError, load_backend

    model_dir = make_model("plt", head_dim=32, plt_window_size=[15, 0])
    load_backend("torch", model_dir, kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    with pytest.raises(BackendError, match="quantized_kv_start"):
        load_backend("torch", model_dir, kv_bits=8, kv_group_size=32, quantized_kv_start=-1)
    load_backend("torch", model_dir, kv_bits=4, kv_group_size=32)  # the group = the head dim
    with pytest.raises(BackendError, match="divide the head dim 32"):
        load_backend("torch", model_dir, kv_bits=4, kv_group_size=64)


# ---- the prompt cache ----------------------------------------------------------------------
def finished_state(backend, tokens):
    """A one-sequence state holding `tokens` with its history, as a finished request leaves."""
    from runtimes.prompt_cache import history_policy

    state, _ = backend.prefill([tokens], len(tokens) + 1, history=history_policy(backend))
    return state


def test_prompt_cache_holds_max_entries_and_evicts_one_more(small_model):
    from runtimes.backends import load_backend
    from runtimes.prompt_cache import PromptCache

    backend = load_backend("torch", small_model)
    cache = PromptCache(max_entries=3)
    prompts = random_prompts([6, 7, 8, 9], seed=5)
    for prompt in prompts[:3]:
        cache.insert(backend, finished_state(backend, prompt))
    assert len(cache) == 3
    cache.insert(backend, finished_state(backend, prompts[3]))
    assert len(cache) == 3
    assert [list(e.tokens) for e in cache.entries.values()] == prompts[1:]


def test_prompt_cache_bytes_bound_keeps_an_entry_of_exactly_max_bytes(small_model):
    from runtimes.backends import load_backend
    from runtimes.prompt_cache import PromptCache

    backend = load_backend("torch", small_model)
    prompt = random_prompts([10], seed=6)[0]
    probe = PromptCache(max_entries=5, max_bytes=2 ** 40)
    probe.insert(backend, finished_state(backend, prompt))
    size = probe.nbytes
    exact = PromptCache(max_entries=5, max_bytes=size)
    exact.insert(backend, finished_state(backend, prompt))
    assert (len(exact), exact.nbytes) == (1, size)
    under = PromptCache(max_entries=5, max_bytes=size - 1)
    under.insert(backend, finished_state(backend, prompt))
    assert len(under) == 0
    two = PromptCache(max_entries=5, max_bytes=2 * size)
    other = random_prompts([10], seed=7)[0]
    for tokens in (prompt, other):
        two.insert(backend, finished_state(backend, tokens))
    assert len(two) == 2 and two.nbytes == 2 * size
    two.trim_to(2 * size - 1)
    assert len(two) == 1 and list(next(iter(two.entries.values())).tokens) == other


def test_prompt_cache_size_0_is_off_and_minus_1_refused(small_model):
    from runtimes.backends import load_backend
    from runtimes.prompt_cache import PromptCache, PromptCacheError

    backend = load_backend("torch", small_model)
    off = PromptCache(max_entries=0)
    off.insert(backend, finished_state(backend, [5, 6, 7]))
    assert len(off) == 0
    for bad in (dict(max_entries=-1), dict(max_bytes=-1)):
        with pytest.raises(PromptCacheError, match="must be an integer >= 0"):
            PromptCache(**bad)


# ---- chat templates, the corpus, the demo ------------------------------------------------
def test_template_repeat_at_the_limit_and_one_past(tokenizer_dir):
    from plt_port.chat_template import MAX_TEMPLATE_REPEAT
    from plt_port.tokenizer import Tokenizer, TokenizerError

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    messages = [{"role": "user", "content": "x"}]
    tokenizer.chat_template = "{{ 'a' * %d }}" % MAX_TEMPLATE_REPEAT
    assert len(tokenizer.apply_chat_template(messages)) == MAX_TEMPLATE_REPEAT
    tokenizer.chat_template = "{{ 'a' * %d }}" % (MAX_TEMPLATE_REPEAT + 1)
    with pytest.raises(TokenizerError, match="would build more than"):
        tokenizer.apply_chat_template(messages)


def test_corpus_file_size_caps_are_inclusive(tmp_path):
    from plt_port.data import corpus_files

    sizes = {"exact.py": 100, "over.py": 101, "small.py": 50}
    for name, size in sizes.items():
        (tmp_path / name).write_text("#" * (size - 1) + "\n")
    chosen = corpus_files("all", str(tmp_path), max_file_bytes=100, max_total_bytes=150)
    assert sorted(os.path.basename(path) for path in chosen) == ["exact.py", "small.py"]
    assert len(corpus_files("all", str(tmp_path), max_file_bytes=100, max_total_bytes=149)) == 1


def test_demo_prompt_characters_at_the_limit():
    from demo.columns import DemoInputError, Limits, make_request

    limits = Limits(max_prompt_tokens=4)
    fields = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    make_request("a" * limits.max_prompt_chars, limits, **fields)
    with pytest.raises(DemoInputError, match="at most 64"):
        make_request("a" * (limits.max_prompt_chars + 1), limits, **fields)
    make_request("x", limits, **{**fields, "temperature": 2.0, "top_p": 0.01, "top_k": 1000})
    for name, bad in (("temperature", 2.01), ("top_p", 0.009), ("top_k", 1001)):
        with pytest.raises(DemoInputError):
            make_request("x", limits, **{**fields, name: bad})
