"""PyTorch backend: cached prefill + decode against the full-sequence reference forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plt_port.config import ConfigError
from conftest import random_prompts
from runtimes import BackendError, load_backend
from runtimes.torch_backend import TorchBackend

TOL = 1e-4


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
