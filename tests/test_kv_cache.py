"""The quantized KV cache (kv_bits / kv_group_size / quantized_kv_start, mlx-lm's options) on
the torch and MLX backends, and cache bytes against `plt-port info`'s arithmetic.

- torch's quantizer is MLX's (`mx.quantize`) value for value, and the two backends' quantized
  decodes agree at fp32 (two implementations: torch dequantizes then runs SDPA, MLX runs
  mlx-lm's quantized_matmul attention);
- logits do not depend on chunking or batching; quantized_kv_start converts the batch once a
  sequence reaches it;
- the agreement with the unquantized cache stays within the bounds measured on this model,
  and a quantizer bug (scales of the wrong group) breaks them;
- cache bytes are those of info's formula (within 5 %) at batch > 1 and at the window's edges.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import greedy_run, random_prompts, requires
from runtimes.backends import BackendError, backend_unavailable_reason, load_backend

KV = dict(head_dim=32, plt_window_size=[15, 0])  # heads wide enough for a group of 32
QUANT_BACKENDS = ["torch", "mlx"]
# Measured on this loud model (seed 0, 3 loops, prompt 40, 24 teacher-forced steps, group
# 32): kv8 mean KL 4.3e-5, 24/24 identical; kv4 4.4e-3, 23/24 (seeds 1-3 of the same shape:
# kv8 1.4-4.2e-5, all identical; kv4 4.3-7.7e-3, 0.5-0.75 identical: near-tied logits of a
# random model). Bounds: about 4.5x the measured KL.
BOUNDS = {8: dict(kl=2e-4, identical=1.0), 4: dict(kl=2e-2, identical=0.75)}


@pytest.fixture(params=QUANT_BACKENDS)
def quant_backend(request):
    reason = backend_unavailable_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@requires("mlx")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_torch_quantizer_is_mlx_quantize(dtype, bits):
    import mlx.core as mx
    import torch

    from plt_port.cache_layout import KVQuant
    from runtimes.backends.torch_kv import dequantize, quantize

    kv_quant = KVQuant(bits, 32)
    x = torch.from_numpy(np.random.default_rng(bits).standard_normal((3, 2, 17, 64),
                                                                     np.float32))
    x = x.to(getattr(torch, dtype))
    ours = dequantize(*quantize(x, kv_quant), kv_quant).float().numpy()
    mlx_x = mx.array(x.float().numpy()).astype(getattr(mx, dtype))
    theirs = mx.dequantize(*mx.quantize(mlx_x, group_size=32, bits=bits), group_size=32,
                           bits=bits)
    np.testing.assert_array_equal(ours, np.array(theirs.astype(mx.float32)))
    assert 0 < np.abs(ours - x.float().numpy()).max() < (0.05 if bits == 8 else 0.5)


@requires("mlx")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["clp", "naive"])
def test_torch_and_mlx_quantized_caches_decode_alike(make_model, bits, mode):
    model_dir = make_model("plt", **KV)
    prompts = random_prompts([37, 9], seed=1)
    runs = [greedy_run(load_backend(name, model_dir, loops=3, kv_bits=bits), prompts, 8,
                       mode, chunk_size=16)[1] for name in QUANT_BACKENDS]
    np.testing.assert_allclose(np.stack(runs[0]), np.stack(runs[1]), atol=1e-4, rtol=0)


def test_quantized_logits_do_not_depend_on_chunks_or_batches(quant_backend, make_model):
    backend = load_backend(quant_backend, make_model("plt", **KV), loops=2, kv_bits=4)
    prompts = random_prompts([29, 12], seed=2)
    _, whole, _ = greedy_run(backend, prompts, 5)
    _, chunked, _ = greedy_run(backend, prompts, 5, chunk_size=7)
    _, alone, _ = greedy_run(backend, prompts[1:], 5, max_tokens=34)
    np.testing.assert_allclose(np.stack(whole), np.stack(chunked), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(whole)[:, 1], np.stack(alone)[:, 0], atol=1e-5, rtol=0)


def agreement_of(model_dir, backend, bits):
    from runtimes.precision import agreement

    prompt = random_prompts([40], seed=3)[0]
    return agreement(model_dir, prompt, steps=24, loops=3, variants=(f"kv{bits}",),
                     backend=backend, chunk_size=16)[f"kv{bits}"]


@pytest.mark.parametrize("bits", [8, 4])
def test_agreement_with_the_unquantized_cache_stays_in_its_bounds(quant_backend, make_model,
                                                                  bits):
    row = agreement_of(make_model("plt", **KV), quant_backend, bits)
    assert 0 < row["mean_kl"] <= BOUNDS[bits]["kl"], row
    assert row["identical_greedy"] >= BOUNDS[bits]["identical"], row


@pytest.mark.parametrize("bits", [8, 4])
def test_scales_of_the_wrong_group_break_the_bounds(make_model, monkeypatch, bits):
    """A planted quantizer bug: each group dequantized with the scale of the same group of
    the previous position."""
    import torch

    from runtimes.backends import torch_kv

    dequantize = torch_kv.dequantize
    monkeypatch.setattr(torch_kv, "dequantize", lambda packed, scales, biases, kv_quant:
                        dequantize(packed, torch.roll(scales, 1, dims=-2), biases, kv_quant))
    row = agreement_of(make_model("plt", **KV), "torch", bits)
    assert row["mean_kl"] > BOUNDS[bits]["kl"] or \
        row["identical_greedy"] < BOUNDS[bits]["identical"], row


def test_quantized_kv_start_converts_the_batch_once_a_sequence_reaches_it(quant_backend,
                                                                        make_model):
    """mlx-lm's quantized_kv_start: dense (the unquantized logits, its bytes) until a call
    leaves a sequence with >= start tokens, quantized from then on; a quantized sequence
    written into a dense batch converts the batch."""
    model_dir = make_model("plt", **KV)
    dense = load_backend(quant_backend, model_dir, loops=2)
    late = load_backend(quant_backend, model_dir, loops=2, kv_bits=8, quantized_kv_start=20)
    prompts = random_prompts([12, 5], seed=4)
    _, dense_logits, dense_state = greedy_run(dense, prompts, 12, max_tokens=30)
    state, logits = late.prefill(prompts, 30)
    history = [logits]
    for i in range(12):
        tokens = dense_logits[i].argmax(-1)
        history.append(late.step(state, tokens))
        if state.lengths.max() < 20:
            assert late.cache_bytes(state) == dense.cache_bytes(dense_state)
            np.testing.assert_array_equal(history[-1], dense_logits[i + 1])
    assert state.lengths.max() == 24
    assert late.cache_bytes(state) == late.expected_cache_bytes(2, 30, 4) \
        < dense.cache_bytes(dense_state)
    assert np.abs(history[-1] - dense_logits[-1]).max() > 0  # quantized now
    running = dense.empty_state(2, 30)
    quantized = load_backend(quant_backend, model_dir, loops=2, kv_bits=8)
    quantized.write_slot(running, 0, dense.prefill(prompts[:1], 30)[0])
    quantized.write_slot(running, 1, quantized.prefill(prompts[1:], 30)[0])
    assert quantized.cache_bytes(running) == quantized.expected_cache_bytes(2, 30, 4)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("capacity", [16, 17, 40], ids=["=window", "window+1", ">window"])
def test_cache_bytes_are_infos_within_5_percent(backend_name, make_model, bits, capacity):
    """A batch of 3 at capacities at the window's edges: the bytes the backend holds against
    `plt-port info`'s arithmetic (plt_port.sizing.kv_cache_bytes)."""
    from plt_port.sizing import kv_cache_bytes

    if bits and backend_name == "onnx":
        pytest.skip("the onnx backend keeps its caches in the export's dtype")
    model_dir = make_model("plt", **KV)
    backend = load_backend(backend_name, model_dir, loops=3, kv_bits=bits)
    state, _ = backend.prefill(random_prompts([capacity, 9, 3], seed=5), capacity)
    info = kv_cache_bytes(backend.config, capacity, 3, 3, backend.run_dtype, bits)
    assert abs(backend.cache_bytes(state) - info) <= 0.05 * info


def test_bad_kv_options_are_one_clear_error(make_model):
    model_dir = make_model("plt", **KV)
    for options, message in [(dict(kv_bits=3), "kv_bits must be one of"),
                             (dict(kv_bits=8, kv_group_size=64), "divide the head dim 32"),
                             (dict(kv_bits=8, quantized_kv_start=-1), "quantized_kv_start")]:
        with pytest.raises(BackendError, match=message):
            load_backend("torch", model_dir, **options)
    if not backend_unavailable_reason("onnx"):
        with pytest.raises(BackendError, match="onnx backend keeps its KV caches"):
            load_backend("onnx", model_dir, kv_bits=8)
