"""Random model directories of any size, without any deep-learning framework.

Used by the tests (tiny checkpoints in both formats) and by `plt-port bench` (e.g. a
~100M-parameter model whose weights do not fit the CPU caches); `PRESETS` are their sizes.
"""

from __future__ import annotations

import os

import numpy as np

from .checkpoint import expected_shapes, numpy_dtype, save_model_dir
from .config import PLTConfig

# Random PLT models (LoopCoder-v2 form: hidden-state gate, window [64, 0]) by size: the sizes
# of `plt-port bench --random` and of the tests' tiny models.
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=512,
                 max_position_embeddings=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=688, vocab_size=4096),   # ~5M
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, vocab_size=16384),  # ~100M
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, intermediate_size=2816, vocab_size=32000),  # ~340M
}
RANDOM_BASE = dict(model_type="iquestpltcoder", plt_num_loops=2, plt_window_size=[64, 0],
                   plt_gate_use_hidden_states=True, max_position_embeddings=4096,
                   torch_dtype="bfloat16")  # stored like the released checkpoints


def random_tensors(config: PLTConfig, seed: int = 0, std: float = 0.02,
                   gate_std: float = 0.5, dtype=None) -> dict[str, np.ndarray]:
    """Weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1); gate weights and bias ~ N(0, gate_std)
    so that the gate takes clearly different values per token and head. `dtype` None: the
    config's torch_dtype."""
    rng = np.random.default_rng(seed)
    dtype = dtype or numpy_dtype(config.torch_dtype)
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
