"""The CUDA paths, on a GPU only (`make check-cuda` installs onnxruntime-gpu and CUDA torch into
their own environment and runs these): ONNX Runtime's CUDA execution provider and torch on
CUDA against the reference model, with the caches on the device and no silent CPU fallback.
"""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest

from conftest import assert_error_fits_precision, greedy_run, random_prompts, reference_logits
from runtimes.backends import backend_unavailable_reason, load_backend

TOL = 1e-4
pytestmark = pytest.mark.accelerator


def ort_cuda_missing() -> str | None:
    if backend_unavailable_reason("onnx"):
        return backend_unavailable_reason("onnx")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu with a GPU (CUDAExecutionProvider is not available here)"
    return None


def torch_cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device (torch sees none here)"


needs_ort_cuda = pytest.mark.skipif(ort_cuda_missing() is not None, reason=str(ort_cuda_missing()))
needs_torch_cuda = pytest.mark.skipif(torch_cuda_missing() is not None,
                                      reason=str(torch_cuda_missing()))


def assert_parity(backend, model_dir, loops, mode="clp"):
    prompts = random_prompts([13, 5], seed=9)
    sequences, history, state = greedy_run(backend, prompts, 16, mode, chunk_size=6)
    reference = reference_logits(model_dir, sequences, loops)
    for b, prompt in enumerate(prompts):
        expected = reference[b][len(prompt) - 1:len(prompt) + 16]
        np.testing.assert_allclose(np.stack([h[b] for h in history]), expected, atol=TOL, rtol=0)
    return state


@needs_ort_cuda
@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("mode", ["clp", "naive"])
def test_ort_cuda_fp32_matches_reference_with_caches_on_the_gpu(make_model, fmt, mode):
    model_dir = make_model(fmt)
    backend = load_backend("onnx", model_dir, loops=3, provider="cuda")
    assert backend.device == "cuda"
    state = assert_parity(backend, model_dir, 3, mode)
    caches = state.caches
    values = [v for layer in caches["global"] + caches.get("ring", []) for v in layer.values()]
    assert {v.device_name() for v in values} == {"cuda"}


@needs_ort_cuda
def test_ort_cuda_fp16_error_fits_fp16(make_model):
    model_dir = make_model("plt")
    backend = load_backend("onnx", model_dir, loops=2, provider="cuda", dtype="float16")
    prompts = random_prompts([12], seed=3)
    sequences, history, _ = greedy_run(backend, prompts, 8)
    expected = reference_logits(model_dir, sequences, 2)[0][11:20]
    assert_error_fits_precision(np.stack([h[0] for h in history]), expected, "float16")


@needs_ort_cuda
def test_ort_cuda_runs_attention_and_matmuls_on_the_gpu(make_model, tmp_path, monkeypatch):
    """ORT's profile names the provider of every node it ran: the attention and matmul nodes
    ran on CUDA in prefill, CLP and naive steps (a node without a CUDA kernel would fall back
    to the CPU)."""
    import onnxruntime as ort

    plain_options = ort.SessionOptions

    def profiled_options():
        options = plain_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "ort")
        return options

    monkeypatch.setattr(ort, "SessionOptions", profiled_options)
    backend = load_backend("onnx", make_model("plt"), loops=3, provider="cuda")
    greedy_run(backend, random_prompts([9]), 3, "clp")
    greedy_run(backend, random_prompts([9]), 2, "naive")
    backend.session.end_profiling()
    events = [e for path in glob.glob(str(tmp_path / "ort*.json"))
              for e in json.load(open(path)) if e.get("cat") == "Node" and "args" in e]
    heavy = [e["args"] for e in events
             if e["args"].get("op_name") in ("Attention", "GroupQueryAttention", "MatMul", "Gemm",
                                             "MatMulNBits")]
    assert {a["op_name"] for a in heavy} >= {"Attention", "MatMul"}
    assert {a.get("provider") for a in heavy} == {"CUDAExecutionProvider"}


@needs_torch_cuda
@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_torch_cuda_fp32_matches_reference(make_model, fmt):
    model_dir = make_model(fmt)
    assert_parity(load_backend("torch", model_dir, loops=3, device="cuda"), model_dir, 3)


@needs_torch_cuda
def test_torch_cuda_bf16_error_fits_bf16(make_model):
    model_dir = make_model("plt")
    backend = load_backend("torch", model_dir, loops=2, device="cuda", dtype="bfloat16")
    assert backend.run_dtype == "bfloat16"
    prompts = random_prompts([12], seed=3)
    sequences, history, _ = greedy_run(backend, prompts, 8)
    expected = reference_logits(model_dir, sequences, 2)[0][11:20]
    assert_error_fits_precision(np.stack([h[0] for h in history]), expected, "bfloat16")


@needs_ort_cuda
def test_ort_cuda_keeps_a_16bit_checkpoints_caches_in_float16(make_model):
    """A bf16 checkpoint on CUDA runs a float16 export by default: weights, activations and
    every cache in float16 on the device (half the fp32 bytes), within the fp16 error bound."""
    model_dir = make_model("plt", torch_dtype="bfloat16")
    backend = load_backend("onnx", model_dir, loops=2, provider="cuda")
    assert backend.run_dtype == "float16"
    prompts = random_prompts([12], seed=3)
    sequences, history, state = greedy_run(backend, prompts, 8)
    values = [v for layer in state.caches["global"] + state.caches["ring"] for v in layer.values()]
    assert {v.data_type() for v in values} == {"tensor(float16)"}
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, state.capacity, 2)
    # the reference runs the same bf16-stored weights in fp32
    expected = reference_logits(model_dir, sequences, 2)[0][11:20]
    assert_error_fits_precision(np.stack([h[0] for h in history]), expected, "float16")


@needs_torch_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_torch_cuda_quantized_kv_cache(make_model, bits):
    """torch's KV quantization on the GPU: the bytes of info's formula, and the agreement
    with the unquantized cache within the bounds measured on the CPU (tests/test_kv_cache.py)."""
    from test_kv_cache import BOUNDS, KV

    from runtimes.precision import agreement

    model_dir = make_model("plt", **KV)
    backend = load_backend("torch", model_dir, loops=3, device="cuda", kv_bits=bits)
    state, _ = backend.prefill(random_prompts([40, 9], seed=3), 64)
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(2, 64, 4)
    assert all(t.device.type == "cuda" for t in state.caches.tensors())
    prompt = random_prompts([40], seed=3)[0]
    row = agreement(model_dir, prompt, steps=24, loops=3, variants=(f"kv{bits}",),
                    backend="torch", chunk_size=16, device="cuda")[f"kv{bits}"]
    assert row["mean_kl"] <= BOUNDS[bits]["kl"] and \
        row["identical_greedy"] >= BOUNDS[bits]["identical"], row
