"""MLX backend (runtimes.base contract) over runtimes/mlx_model.py. Imports MLX only, no torch.

`model_dir` is either a PyTorch (HF layout) model directory, exported on first use into the
export cache (exporters.cache.ensure_exported, with `dtype`/`quantize`/`group_size`), or a
directory written by `plt-port export mlx` (its config.json has an `mlx_export` entry).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from exporters import mlx_export
from exporters.cache import ensure_exported
from plt_port import checkpoint

from . import mlx_model
from .base import Backend, BackendError, DecodeState

KERNEL_CHOICES = {"auto": None, "on": True, "off": False}


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, model_dir: str, loops: int | None = None, kernel: str = "auto",
                 dtype: str | None = None, quantize: int | None = None, group_size: int = 64):
        if kernel not in KERNEL_CHOICES:
            raise BackendError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {kernel!r}")
        if kernel == "on" and not mx.metal.is_available():
            raise BackendError("kernel='on' needs the Metal G-SWA kernel, and Metal is not "
                               "available here (mx.metal.is_available() is False)")
        mlx_export.check_options(dtype or "float32", quantize, group_size)  # before any export
        model_dir = str(model_dir)
        checkpoint.check_model_dir(model_dir)
        self.source_dir = model_dir
        if mlx_export.is_mlx_dir(model_dir):
            if quantize is not None:
                raise BackendError(f"{model_dir} is already an MLX export; quantize from the "
                                   f"PyTorch model directory")
        else:
            model_dir = ensure_exported(model_dir, "mlx", mlx_export.export,
                                        dtype=dtype or "float32", quantize=quantize,
                                        group_size=group_size)
        super().__init__(model_dir, loops)
        self.kernel = kernel
        self.model = mlx_model.load_model(model_dir, dtype=getattr(mx, dtype) if dtype else None)
        self.model.use_gswa_kernel = KERNEL_CHOICES[kernel]
        self.dtype = self.model.model.norm.weight.dtype

    def prefill(self, prompts, max_tokens, chunk_size=None):
        self.check_prompts(prompts, max_tokens, chunk_size)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        T = int(lengths.max())
        padded = np.zeros((len(prompts), T), dtype=np.int32)
        for b, prompt in enumerate(prompts):
            padded[b, :len(prompt)] = prompt
        cache = self.model.make_cache(len(prompts), max_tokens, self.loops)
        chunk_size = chunk_size or T
        last_hidden = [None] * len(prompts)
        for start in range(0, T, chunk_size):
            chunk = mx.array(padded[:, start:start + chunk_size])
            h = self.model.prefill(chunk, cache, start, lengths)
            for b in np.nonzero((lengths > start) & (lengths <= start + chunk.shape[1]))[0]:
                last_hidden[b] = h[b, lengths[b] - 1 - start]
            mx.eval(cache.arrays(), [x for x in last_hidden if x is not None])
        logits = self.model.lm_logits(mx.stack(last_hidden))
        return DecodeState(lengths, cache.capacity, cache), self._numpy(logits)

    def step(self, state, tokens, mode="clp"):
        mode, tokens = self.check_step(state, tokens, mode)
        cache = state.caches
        logits = self.model.step(mx.array(tokens.astype(np.int32)), cache, state.lengths, mode)
        mx.eval(logits, cache.arrays())
        state.lengths = state.lengths + 1
        state.capacity = cache.capacity
        return self._numpy(logits)

    def cache_bytes(self, state):
        return state.caches.nbytes

    def peak_memory_bytes(self):
        return mx.get_peak_memory()

    @staticmethod
    def _numpy(logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))
