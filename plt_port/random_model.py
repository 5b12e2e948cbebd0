"""Random model directories of any size, without any deep-learning framework.

Used by the tests (tiny checkpoints in both formats) and by `plt-port bench` (e.g. a
~100M-parameter model whose weights do not fit the CPU caches).
"""

from __future__ import annotations

import os

import numpy as np

from .checkpoint import expected_shapes, save_model_dir
from .config import PLTConfig


def random_tensors(config: PLTConfig, seed: int = 0, std: float = 0.02,
                   gate_std: float = 0.5, dtype=np.float32) -> dict[str, np.ndarray]:
    """Weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1); gate weights and bias ~ N(0, gate_std)
    so that the gate takes clearly different values per token and head."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "gate_projections" in name or "plt_gate" in name:
            value = gate_std * rng.standard_normal(shape)
        else:
            value = std * rng.standard_normal(shape)
        tensors[name] = value.astype(dtype)
    return tensors


def save_random_model(out_dir: str | os.PathLike, config: PLTConfig, seed: int = 0,
                      tokenizer_dir: str | None = None, max_shard_bytes: int | None = None,
                      **kwargs) -> str:
    save_model_dir(out_dir, config, random_tensors(config, seed, **kwargs), tokenizer_dir,
                   max_shard_bytes)
    return os.fspath(out_dir)
