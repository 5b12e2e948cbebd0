"""PyTorch backend: cached prefill + decode against the full-sequence reference forward."""

from __future__ import annotations

import numpy as np
import pytest

from plt_port.config import ConfigError
from runtimes.backends import BackendError
from runtimes.backends.torch_backend import TorchBackend

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


