"""One vLLM engine per process (vLLM keeps process-wide state), for tests/test_vllm.py and the
CLP/naive bench of `make test-vllm`.

    python tests/vllm_engine.py JOB.json OUT.json     greedy run of a job (see `run_job`)
    python tests/vllm_engine.py --bench               decode step time, CLP against naive

Small on purpose: the CPU machines are shared (1 GiB of KV cache, short contexts, 4 requests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              enforce_eager=True, skip_tokenizer_init=True, seed=0)


def run_job(job: dict) -> dict:
    """job: model, engine (LLM kwargs over ENGINE), prompts (token ids), max_tokens ->
    tokens and the logprob of each chosen token, per prompt; the tokens and seconds of a
    second, warm run of the same prompts (new requests in reused state slots); whether the
    engine ended up with prefix caching."""
    from vllm import LLM, SamplingParams

    llm = LLM(job["model"], **{**ENGINE, **job.get("engine", {})})
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=0,
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    completions = [output.outputs[0] for output in llm.generate(prompts, params, use_tqdm=False)]
    start = time.perf_counter()
    repeats = [output.outputs[0] for output in llm.generate(prompts, params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    return {"tokens": [list(c.token_ids) for c in completions],
            "logprobs": [[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)]
                         for c in completions],
            "repeat_tokens": [list(c.token_ids) for c in repeats], "seconds": seconds,
            "prefix_caching": llm.llm_engine.vllm_config.cache_config.enable_prefix_caching}


def run_in_subprocess(job: dict, timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        job_path, out_path = os.path.join(folder, "job.json"), os.path.join(folder, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        result = subprocess.run([sys.executable, __file__, job_path, out_path],
                                env={**os.environ, **ENV}, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"vLLM engine failed ({result.returncode}):\n"
                               f"{result.stderr[-6000:]}")
        with open(out_path) as f:
            return json.load(f)


def bench(loops: int = 4, requests: int = 4, new_tokens: int = 96) -> None:
    """Decode-heavy generate on a random 'small' LoopCoder-v2 model: CLP against naive loops."""
    import numpy as np

    from plt_port.config import PLTConfig
    from plt_port.random_model import PRESETS, RANDOM_BASE, save_random_model

    with tempfile.TemporaryDirectory() as folder:
        config = PLTConfig(**{**RANDOM_BASE, **PRESETS["small"], "plt_num_loops": loops,
                              "max_position_embeddings": 512})
        model = save_random_model(os.path.join(folder, "small"), config)
        prompts = np.random.default_rng(0).integers(3, config.vocab_size, (requests, 8)).tolist()
        seconds = {}
        for mode in ("clp", "naive"):
            job = {"model": model, "prompts": prompts, "max_tokens": new_tokens,
                   "engine": {"hf_overrides": {"plt_decode": mode}, "max_model_len": 256}}
            seconds[mode] = run_in_subprocess(job)["seconds"]
        step_ms = {mode: 1000 * s / new_tokens for mode, s in seconds.items()}
        print(f"vLLM CPU decode step, {requests} requests, L={loops}, 'small' model: "
              f"CLP {step_ms['clp']:.2f} ms, naive {step_ms['naive']:.2f} ms, "
              f"naive/CLP {step_ms['naive'] / step_ms['clp']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:] == ["--bench"]:
        bench()
    else:
        with open(sys.argv[1]) as f:
            job = json.load(f)
        with open(sys.argv[2], "w") as f:
            json.dump(run_job(job), f)
