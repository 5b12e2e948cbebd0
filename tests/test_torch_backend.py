"""PyTorch backend: cached prefill + decode against the full-sequence reference forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plt_port.config import ConfigError, PLTConfig
from plt_port.model import PLTForCausalLM
from runtimes import BackendError, load_backend
from runtimes.torch_backend import TorchBackend

TOL = 1e-4


def reference_logits(model, sequence, loops):
    with torch.no_grad():
        return model(torch.tensor([sequence]), loops=loops)[0, -1].numpy()


def random_prompts(lengths, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("fmt", ["plt", "v1"])
@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["clp", "naive"])
def test_prefill_and_decode_match_reference(make_model, fmt, loops, mode):
    """Batch of 3 prompts of different lengths (two longer than the window of 8), prefilled
    in chunks of 5, then 6 greedy steps: every logit row equals the full forward."""
    model_dir = make_model(fmt)
    reference = PLTForCausalLM.from_pretrained(model_dir)
    backend = TorchBackend(model_dir, loops=loops)
    sequences = random_prompts([19, 4, 11], seed=loops)
    state, logits = backend.prefill(sequences, max_tokens=32, chunk_size=5)
    for _ in range(6):
        for b, sequence in enumerate(sequences):
            np.testing.assert_allclose(logits[b], reference_logits(reference, sequence, loops),
                                       atol=TOL, rtol=0)
        tokens = logits.argmax(-1)
        for sequence, token in zip(sequences, tokens):
            sequence.append(int(token))
        logits = backend.step(state, tokens, mode=mode)
    assert logits.dtype == np.float32
    assert state.lengths.tolist() == [len(s) for s in sequences]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 9, None])
def test_chunked_prefill_odd_sizes(make_model, chunk_size):
    model_dir = make_model("plt")
    reference = PLTForCausalLM.from_pretrained(model_dir)
    backend = TorchBackend(model_dir, loops=3)
    prompts = random_prompts([17, 9], seed=3)
    state, logits = backend.prefill(prompts, max_tokens=24, chunk_size=chunk_size)
    for b, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[b], reference_logits(reference, prompt, 3), atol=TOL,
                                   rtol=0)
    # the caches the chunks left behind decode correctly too
    tokens = np.array([5, 6])
    logits = backend.step(state, tokens, mode="clp")
    for b, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[b], reference_logits(reference, prompt + [int(tokens[b])],
                                                               3), atol=TOL, rtol=0)


@pytest.mark.parametrize("fmt", ["plt", "v1"])
def test_batch_equals_one_by_one(make_model, fmt):
    backend = TorchBackend(make_model(fmt), loops=3)
    prompts = random_prompts([3, 14, 9], seed=7)
    state, batch_logits = backend.prefill(prompts, max_tokens=40, chunk_size=4)
    singles = [backend.prefill([p], max_tokens=40) for p in prompts]
    rng = np.random.default_rng(1)
    for _ in range(10):
        for b, (single_state, single_logits) in enumerate(singles):
            np.testing.assert_allclose(batch_logits[b], single_logits[0], atol=1e-5, rtol=0)
        tokens = rng.integers(3, 512, len(prompts))
        batch_logits = backend.step(state, tokens, mode="clp")
        singles = [(s, backend.step(s, tokens[b:b + 1], mode="clp"))
                   for b, (s, _) in enumerate(singles)]


@pytest.mark.parametrize("loops", [2, 4])
def test_clp_and_naive_same_greedy_tokens_64_steps(make_model, loops):
    backend = TorchBackend(make_model("plt", seed=1), loops=loops)
    prompt = random_prompts([6], seed=2)

    def greedy(mode):
        state, logits = backend.prefill(prompt, max_tokens=16)  # grows past 16 while decoding
        tokens, all_logits = [], []
        for _ in range(64):
            token = logits.argmax(-1)
            tokens.append(int(token[0]))
            logits = backend.step(state, token, mode=mode)
            all_logits.append(logits[0])
        return tokens, np.stack(all_logits), state

    clp_tokens, clp_logits, clp_state = greedy("clp")
    naive_tokens, naive_logits, _ = greedy("naive")
    assert clp_tokens == naive_tokens
    np.testing.assert_allclose(clp_logits, naive_logits, atol=TOL, rtol=0)
    assert clp_state.capacity >= 6 + 64
    assert len(set(clp_tokens)) > 1  # a random model that repeats one token proves little


def test_cache_growth_matches_reference(make_model):
    model_dir = make_model("plt")
    reference = PLTForCausalLM.from_pretrained(model_dir)
    backend = TorchBackend(model_dir, loops=2)
    sequence = random_prompts([5], seed=4)[0]
    state, logits = backend.prefill([sequence], max_tokens=5)
    for token in [9, 10, 11]:
        sequence.append(token)
        logits = backend.step(state, np.array([token]), mode="clp")
    assert state.capacity > 5
    np.testing.assert_allclose(logits[0], reference_logits(reference, sequence, 2), atol=TOL,
                               rtol=0)


def test_clp_reads_each_weight_once_per_step(make_model):
    """CLP: one pass (each projection called once per layer); naive: L passes."""
    backend = TorchBackend(make_model("plt"), loops=3)
    layers = backend.model.config.num_hidden_layers
    calls = []
    handles = [layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
               for layer in backend.model.model.layers]
    state, logits = backend.prefill([[5, 6, 7]], max_tokens=8)
    for mode, passes in [("clp", 1), ("naive", 3)]:
        calls.clear()
        backend.step(state, np.array([4]), mode=mode)
        assert len(calls) == passes * layers, mode
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("fmt,loops", [("plt", 1), ("plt", 3), ("v1", 2), ("v1", 4)])
def test_cache_bytes_follow_spec(make_model, fmt, loops):
    config_overrides = dict(plt_window_size=[4, 0]) if fmt == "plt" else dict(loop_window_size=6)
    model_dir = make_model(fmt, **config_overrides)
    cfg = PLTConfig.from_file(model_dir)
    backend = TorchBackend(model_dir, loops=loops)
    batch, capacity = 2, 20
    state, _ = backend.prefill(random_prompts([7, 3]), max_tokens=capacity)
    window = 5 if fmt == "plt" else 6
    # per layer: (global slots + (L-1)*window ring slots) * (K and V) * batch * kv heads * D * 4 B
    per_layer = (capacity + (loops - 1) * window) * 2 * batch * cfg.num_key_value_heads * 16 * 4
    carry = (loops - 1) * batch * 64 * 4 if fmt == "plt" else 0  # [L-1, B, d] fp32, PLT only
    assert backend.cache_bytes(state) == cfg.num_hidden_layers * per_layer + carry
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(batch, capacity, 4)


def test_v1_and_single_loop_decode_sequentially(make_model):
    assert TorchBackend(make_model("v1"), loops=2).mode_run("clp") == "naive"
    assert TorchBackend(make_model("plt"), loops=1).mode_run("clp") == "naive"
    assert TorchBackend(make_model("plt"), loops=2).mode_run("clp") == "clp"


def test_query_gate_unnormalised_scaled_variant(make_model):
    """PLT with the query-form gate, no per-loop norm and non-unit scales."""
    model_dir = make_model("plt", plt_gate_use_hidden_states=False, plt_normalize_per_loop=False,
                           plt_emb_scale=0.5, plt_hidden_scale=1.5)
    reference = PLTForCausalLM.from_pretrained(model_dir)
    backend = TorchBackend(model_dir, loops=3)
    sequence = random_prompts([12], seed=5)[0]
    state, logits = backend.prefill([sequence], max_tokens=20, chunk_size=5)
    for token in [7, 8, 9]:
        sequence.append(token)
        logits = backend.step(state, np.array([token]), mode="clp")
    np.testing.assert_allclose(logits[0], reference_logits(reference, sequence, 3), atol=TOL,
                               rtol=0)


def test_bfloat16_runs_and_returns_fp32(make_model):
    model_dir = make_model("plt")
    reference = PLTForCausalLM.from_pretrained(model_dir)
    backend = TorchBackend(model_dir, loops=2, dtype="bfloat16")
    prompt = random_prompts([9])[0]
    state, logits = backend.prefill([prompt], max_tokens=12)
    assert logits.dtype == np.float32
    assert backend.cache_bytes(state) == backend.expected_cache_bytes(1, 12, 2)
    np.testing.assert_allclose(logits[0], reference_logits(reference, prompt, 2), atol=0.05)


def test_bad_requests_raise_one_clear_error(make_model):
    model_dir = make_model("plt", max_position_embeddings=32)
    backend = load_backend("torch", model_dir, loops=2)
    with pytest.raises(BackendError, match="prompt 1 is empty"):
        backend.prefill([[4], []], max_tokens=8)
    with pytest.raises(BackendError, match="more than the 4 positions"):
        backend.prefill([[4] * 5], max_tokens=4)
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.prefill([[4, 9999]], max_tokens=8)
    with pytest.raises(BackendError, match="chunk size"):
        backend.prefill([[4]], max_tokens=8, chunk_size=0)
    state, _ = backend.prefill([[4, 5]], max_tokens=8)
    with pytest.raises(BackendError, match="decode mode"):
        backend.step(state, np.array([3]), mode="fast")
    with pytest.raises(BackendError, match="one integer token per sequence"):
        backend.step(state, np.array([3, 4]))
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.step(state, np.array([-1]))
    state, _ = backend.prefill([[4] * 31], max_tokens=31)
    backend.step(state, np.array([3]))  # position 31: the last one the model supports
    with pytest.raises(BackendError, match="max_position_embeddings=32"):
        backend.step(state, np.array([3]))
    with pytest.raises(ConfigError, match="loops"):
        TorchBackend(model_dir, loops=0)
    with pytest.raises(BackendError, match="dtype"):
        TorchBackend(model_dir, dtype="int8")
    with pytest.raises(ConfigError, match="no config.json"):
        TorchBackend(str(model_dir) + "-missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_matches_cpu(make_model):
    model_dir = make_model("plt")
    prompt = random_prompts([10])
    cpu, cuda = TorchBackend(model_dir, loops=2), TorchBackend(model_dir, loops=2, device="cuda")
    (cpu_state, cpu_logits), (cuda_state, cuda_logits) = (cpu.prefill(prompt, 16),
                                                          cuda.prefill(prompt, 16))
    np.testing.assert_allclose(cpu_logits, cuda_logits, atol=1e-3)
    np.testing.assert_allclose(cpu.step(cpu_state, np.array([5])),
                               cuda.step(cuda_state, np.array([5])), atol=1e-3)
