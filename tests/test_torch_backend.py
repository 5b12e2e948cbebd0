"""PyTorch backend: cached prefill + decode against the full-sequence reference forward."""

from __future__ import annotations

import numpy as np
import pytest

from plt_port.config import ConfigError
from runtimes.backends import BackendError
from runtimes.backends.torch_backend import TorchBackend

TOL = 1e-4


def test_clp_reads_each_weight_once_per_step(make_model):
    """CLP: one pass (each MLP called once per layer); naive: L passes."""
    backend = TorchBackend(make_model("plt"), loops=3)
    layers = backend.model.config.num_hidden_layers
    calls = []
    handles = [layer.mlp.register_forward_hook(lambda *a: calls.append(1))
               for layer in backend.model.model.layers]
    state, logits = backend.prefill([[5, 6, 7]], max_tokens=8)
    for mode, passes in [("clp", 1), ("naive", 3)]:
        calls.clear()
        backend.step(state, np.array([4]), mode=mode)
        assert len(calls) == passes * layers, mode
    for handle in handles:
        handle.remove()


def test_cpu_fp32_runs_packed_linears_and_grouped_attention(make_model):
    """The fast CPU path (oneDNN weights reordered once, attention as grouped matmuls) is
    the one that runs, and a batch of mixed lengths (masked attention) still equals each
    sequence alone (the contract tests compare the logits with the reference)."""
    import torch

    from runtimes.backends.torch_backend import PackedLinear, grouped_attend

    backend = TorchBackend(make_model("plt"), loops=3)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    linears = [m for m in backend.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(backend.model.lm_head, PackedLinear)
    assert backend.decode_attend is grouped_attend
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11]]
    state, _ = backend.prefill(prompts, max_tokens=16)
    together = backend.step(state, np.array([4, 4, 4]))
    for i, prompt in enumerate(prompts):
        alone, _ = backend.prefill([prompt], max_tokens=16)
        np.testing.assert_allclose(backend.step(alone, np.array([4]))[0], together[i],
                                   atol=TOL)


def test_grouped_attention_equals_sdpa_with_and_without_a_mask():
    import torch

    from plt_port.model import attend
    from runtimes.backends.torch_backend import grouped_attend

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=generator)
               for shape in ((3, 8, 2, 16), (3, 2, 11, 16), (3, 2, 11, 16)))
    mask = torch.rand(3, 1, 2, 11, generator=generator) > 0.4
    mask[..., 0] = True
    for m in (None, mask):
        torch.testing.assert_close(grouped_attend(q, k, v, m), attend(q, k, v, m)[0],
                                   atol=1e-5, rtol=1e-5)


def test_option_errors(make_model):
    model_dir = make_model("plt")
    with pytest.raises(ConfigError, match="loops"):
        TorchBackend(model_dir, loops=0)
    with pytest.raises(BackendError, match="dtype"):
        TorchBackend(model_dir, dtype="int8")
    with pytest.raises(BackendError, match="device"):
        TorchBackend(model_dir, device="tpu")
    with pytest.raises(ConfigError, match="no such model directory"):
        TorchBackend(str(model_dir) + "-missing")


