"""The prompt cache (runtimes/prompt_cache.py) and saved prompt caches
(plt_port/prompt_cache_file.py, plt-port cache-prompt, --prompt-cache-file): through the
server with the openai client, the engine, and the command line."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import random_prompts
from plt_port.prompt_cache_file import PromptCacheFileError
from runtimes.backends import load_backend
from runtimes.prompt_cache import PromptCache, load_state, save_state, shared_prefix
from test_server import embedded_model, rss_bytes, serve

SYSTEM = ("You are a careful Python programmer. Answer with code only.\n"
          "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n") * 4
TURNS = ["def parse(", "    for key in ", "class Cache:\n    def get(self, ", "import os\n",
         "    return sorted(", "def walk(root):\n    ", "with open(path) as f:\n    ",
         "raise ValueError(", "def main(argv):\n    ", "    if not items:\n        "]


def chat_turns(client, loops=None):
    """The 10-turn chat, re-sent whole each turn: [(prompt messages, text, cached tokens)]."""
    messages, turns = [{"role": "system", "content": SYSTEM}], []
    for user in TURNS:
        messages.append({"role": "user", "content": user})
        extra = {"loops": loops} if loops else {}
        done = client.chat.completions.create(model="plt-stdlib-L2", messages=messages,
                                              max_tokens=12, temperature=0, extra_body=extra)
        text = done.choices[0].message.content
        turns.append((list(messages), text, done.usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return turns


def test_a_ten_turn_chat_gives_the_same_text_and_caches_the_shared_prefix():
    """Cache on and off give the same text every turn; from turn 2 on cached_tokens is the
    prefix this turn's prompt ids share with the previous turn's prompt and fed answer ids
    (from a greedy run of the same model outside the server)."""
    from plt_port.tokenizer import Tokenizer
    from runtimes.generate import chat_prompt_ids, stream_generate
    from runtimes.sampling import SamplingParams

    model_dir = embedded_model()
    on = serve(model_dir, prompt_cache=PromptCache())
    off = serve(model_dir)
    try:
        cached_turns, plain_turns = chat_turns(on.client), chat_turns(off.client)
        metrics = on.get("/metrics").text
    finally:
        on.stop()
        off.stop()
    assert [t[1] for t in cached_turns] == [t[1] for t in plain_turns]
    tokenizer = Tokenizer.from_dir(model_dir)
    backend = load_backend("torch", model_dir)
    previous = None
    for k, (messages, text, cached) in enumerate(cached_turns):
        ids = chat_prompt_ids(tokenizer, messages)
        if previous is None:
            assert cached == 0
        else:
            assert cached == min(shared_prefix(previous, ids), len(ids) - 1), f"turn {k + 1}"
            assert cached > len(ids) // 2
        answer = [r.token for r in stream_generate(backend, tokenizer, ids, max_new_tokens=12,
                                                   sampling=SamplingParams(temperature=0))]
        assert tokenizer.decode(answer) == text
        previous = ids + answer[:-1]  # the last token sampled is never fed
    assert "plt_prompt_cache_hits_total 9.0" in metrics
    assert "plt_prompt_cache_misses_total 1.0" in metrics


def test_entries_of_another_loop_count_are_never_used():
    model_dir = embedded_model()
    running = serve(model_dir, prompt_cache=PromptCache())
    try:
        def cached(prompt, loops):
            done = running.client.completions.create(
                model="plt-stdlib-L2", prompt=prompt, max_tokens=3, temperature=0,
                extra_body={"loops": loops})
            return done.usage.prompt_tokens_details.cached_tokens

        assert cached(SYSTEM, 2) == 0
        assert cached(SYSTEM + "def f(", 3) == 0   # the loops=2 entry is not for loops=3
        assert cached(SYSTEM + "def g(", 2) > 0
        assert cached(SYSTEM + "def h(", 3) > 0    # its own entry now
    finally:
        running.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_the_byte_bound_holds_under_distinct_prompts(make_model):
    """60 distinct 400-token prompts, each entry over 3 MiB: the cache never holds more than
    its 10 MiB, and the process's RSS grows by much less than the 150 MiB the last 50
    entries would take unbounded."""
    from plt_port.tokenizer import Tokenizer
    from runtimes.engine import EngineCore, Request

    model_dir = make_model(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4)
    backend = load_backend("torch", model_dir, loops=2)
    cache = PromptCache(max_entries=1000, max_bytes=10 * 2**20)
    core = EngineCore(lambda _: backend, Tokenizer.from_dir(model_dir), max_batch=4,
                      prompt_cache=cache).open()

    def run(prompts):
        for prompt in prompts:
            for _ in core.stream(Request(prompt, 2, emit=None)):
                pass
            assert cache.nbytes <= cache.max_bytes

    run(random_prompts([400] * 10, seed=1))
    entry_bytes = max(e.nbytes for e in cache.entries.values())
    baseline = rss_bytes()
    run(random_prompts([400] * 50, seed=2))
    assert entry_bytes > 3 * 2**20 and len(cache) == cache.max_bytes // entry_bytes
    assert rss_bytes() - baseline < 40 * 2**20


# ---- saved prompt caches -------------------------------------------------------------------------
def test_a_saved_state_continues_like_a_cold_prefill(backend_name, make_model, tmp_path):
    """Saved by one backend and loaded by each (torch's file into ONNX and MLX too: the file
    is backend-neutral for one model, loop count and dtype), fed more tokens: the logits of a
    cold prefill of all of them."""
    model_dir = make_model("plt")
    tokens = random_prompts([40], seed=3)[0]
    maker = load_backend("torch", model_dir, loops=3)
    state, _ = maker.prefill([tokens[:30]], 64, chunk_size=7)
    path = str(tmp_path / "prefix.safetensors")
    save_state(path, maker, state, tokens[:30])
    backend = load_backend(backend_name, model_dir, loops=3)
    loaded = load_state(path, backend)
    assert loaded.history.slots[0].tokens == tokens[:30]
    got = backend.extend(loaded, tokens[30:])
    cold = backend.prefill([tokens], 64)[1]
    assert np.abs(got - cold).max() <= (1e-5 if backend_name == "torch" else 1e-4)


def test_a_quantized_cache_round_trips(make_model, tmp_path):
    model_dir = make_model("plt", hidden_size=128)  # head dim 32: a KV group size
    tokens = random_prompts([30], seed=4)[0]
    backend = load_backend("torch", model_dir, loops=2, kv_bits=8)
    state, _ = backend.prefill([tokens[:20]], 64)
    path = str(tmp_path / "q.safetensors")
    save_state(path, backend, state, tokens[:20])
    got = backend.extend(load_state(path, backend), tokens[20:])
    assert np.abs(got - backend.prefill([tokens], 64)[1]).max() <= 1e-5
    with pytest.raises(PromptCacheFileError, match="KV quantization"):
        load_state(path, load_backend("torch", model_dir, loops=2))


def test_cache_prompt_then_generate_from_it(tokenizer_dir, make_model, tmp_path, capsys):
    """plt-port cache-prompt writes the file whole; generate --prompt-cache-file F PROMPT
    writes what generate of the file's text followed by PROMPT writes; a file of another loop
    count, dtype or model is refused by name, and a broken one is one clear error."""
    from plt_port.app.cli import main

    model_dir = make_model("plt")
    context = open(os.path.join(os.path.dirname(__file__), "conftest.py")).read()[:600]
    prompt_file, out = tmp_path / "context.py", str(tmp_path / "cache" / "context.safetensors")
    prompt_file.write_text(context)
    assert main(["cache-prompt", "--model", model_dir, "--prompt-file", str(prompt_file),
                 out]) == 0
    assert os.listdir(tmp_path / "cache") == ["context.safetensors"]
    capsys.readouterr()

    def generate(*args):
        assert main(["generate", "--model", model_dir, "--max-new-tokens", "8",
                     "--temperature", "0", *args]) == 0
        return capsys.readouterr().out

    assert generate("--prompt-cache-file", out, "def f(") == generate(context + "def f(")
    for args, what in ((["--loops", "3"], "loop count"), (["--dtype", "bfloat16"], "dtype")):
        assert main(["generate", "--model", model_dir, "--prompt-cache-file", out, *args,
                     "x"]) != 0
        assert what in capsys.readouterr().err
    assert main(["generate", "--model", make_model("plt", seed=1), "--prompt-cache-file", out,
                 "x"]) != 0
    assert "another model" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    assert main(["generate", "--model", model_dir, "--prompt-cache-file", str(broken), "x"]) != 0
    assert "prompt cache" in capsys.readouterr().err


def test_serve_starts_from_a_prompt_cache_file(tmp_path):
    """serve --prompt-cache-file: a request whose ids begin with the file's reuses them all,
    and the entry stays however many other requests come."""
    from plt_port.tokenizer import Tokenizer

    model_dir = embedded_model()
    backend = load_backend("torch", model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = tokenizer.encode(SYSTEM, add_bos=tokenizer.add_bos_token)
    state, _ = backend.prefill([ids], len(ids))
    path = str(tmp_path / "system.safetensors")
    save_state(path, backend, state, ids)
    cache = PromptCache(max_entries=1)
    cache.files.append(path)
    running = serve(model_dir, prompt_cache=cache)
    try:
        for prompt in ("import os\n", SYSTEM + "def f(", "x = 1\n", SYSTEM + "def g("):
            done = running.client.completions.create(model="plt-stdlib-L2", prompt=prompt,
                                                     max_tokens=2, temperature=0)
            cached = done.usage.prompt_tokens_details.cached_tokens
            assert cached == (len(ids) if prompt.startswith(SYSTEM) else 0), prompt
    finally:
        running.stop()
