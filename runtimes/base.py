"""The backend contract (SPEC section 6) shared by the torch, MLX and ONNX Runtime backends.

A backend holds one loaded model at one inference loop count. The generate loop, the
sampler, `plt-port bench` and the demo only ever talk to this surface:

    backend = load_backend("torch", model_dir, loops=2)
    state, logits = backend.prefill([[1, 5, 9], [1, 7]], max_tokens=64)   # logits [B, V] fp32
    logits = backend.step(state, np.array([4, 8]), mode="clp")            # one token per sequence
    backend.cache_bytes(state)

Token ids and logits cross the boundary as numpy arrays (int64 ids, float32 logits), so the
sampler is written once. Sequences of one batch may have different prompt lengths: every
sequence keeps its own position. All caches are preallocated for `max_tokens` positions per
sequence (a backend may grow them, in steps, when a step would pass that).

Cache memory (SPEC section 4), per layer: K and V of the global slots allocated plus (L-1)
ring slots of `window` positions, times batch, KV heads, head dim and element size; plus the
CLP carry [L-1, B, d] for PLT checkpoints.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from plt_port.config import PLTConfig
from plt_port.errors import PLTError

DECODE_MODES = ("clp", "naive")
GROW_STEP = 256  # global KV slots are added in multiples of this when a step needs more


def grown_capacity(needed: int, limit: int) -> int:
    """Global-cache capacity for `needed` positions: the next multiple of GROW_STEP, capped at
    max_position_embeddings (the same policy in every backend, so cache bytes compare)."""
    return min(limit, -(-needed // GROW_STEP) * GROW_STEP)


class BackendError(PLTError):
    """A backend that cannot run here, or a request it cannot serve."""


@dataclass
class DecodeState:
    """Per-batch decoding state. `lengths[b]` = tokens of sequence b already in the caches.

    `caches` is backend-specific (tensors/arrays/OrtValues); nothing outside the backend
    reads it. `capacity` = positions allocated per sequence.
    """

    lengths: np.ndarray
    capacity: int
    caches: Any

    @property
    def batch_size(self) -> int:
        return len(self.lengths)


class Backend(abc.ABC):
    name: str = ""

    def __init__(self, model_dir: str, loops: int | None = None, **options):
        self.model_dir = str(model_dir)
        self.config = PLTConfig.from_file(self.model_dir)
        self.loops = self.config.resolve_loops(loops)

    # ---- what every backend implements ------------------------------------------------
    @abc.abstractmethod
    def prefill(self, prompts: list[list[int]], max_tokens: int,
                chunk_size: int | None = None) -> tuple[DecodeState, np.ndarray]:
        """Run the prompts through a fresh state; return it and fp32 logits [B, V] of each
        prompt's last token. `chunk_size` splits the prompts into chunks (same logits)."""

    @abc.abstractmethod
    def step(self, state: DecodeState, tokens: np.ndarray, mode: str = "clp") -> np.ndarray:
        """Append one token per sequence; return fp32 logits [B, V] of those tokens."""

    @abc.abstractmethod
    def cache_bytes(self, state: DecodeState) -> int:
        """Bytes held by the state's caches (global KV + ring KV + CLP carry)."""

    def peak_memory_bytes(self) -> int | None:
        """Peak memory from the framework's own counters, if it has them."""
        return None

    # ---- shared checks -----------------------------------------------------------------
    @property
    def supports_clp(self) -> bool:
        """CLP needs the PLT one-token shift; v1 checkpoints (and L = 1) decode sequentially."""
        return not self.config.is_v1 and self.loops > 1

    def check_threads(self, threads: int | None) -> int | None:
        """A CPU thread count option: None (the framework's default) or an integer >= 1."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise BackendError(f"{self.name} backend: threads must be an integer >= 1, "
                               f"got {threads!r}")
        return threads

    def check_mode(self, mode: str) -> str:
        """The mode actually run: `clp` on a model without CLP runs sequentially (say so)."""
        if mode not in DECODE_MODES:
            raise BackendError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        return mode if self.supports_clp else "naive"

    def check_prompts(self, prompts: list[list[int]], max_tokens: int,
                      chunk_size: int | None = None) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise BackendError(f"prefill chunk size must be a positive integer, got {chunk_size!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                or max_tokens < 1:
            raise BackendError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not prompts:
            raise BackendError("no prompts given")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise BackendError(f"prompt {i} is empty")
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                       for t in prompt):
                raise BackendError(f"prompt {i}: token ids must be integers")
            if len(prompt) > max_tokens:
                raise BackendError(f"prompt {i} has {len(prompt)} tokens, more than the "
                                   f"{max_tokens} positions allocated")
            bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise BackendError(f"prompt {i} has token ids outside the vocabulary "
                                   f"(0..{self.config.vocab_size - 1}): {bad[:5]}")
        if max_tokens > self.config.max_position_embeddings:
            raise BackendError(f"{max_tokens} positions requested, the model supports "
                               f"max_position_embeddings={self.config.max_position_embeddings}")

    def check_step(self, state: DecodeState, tokens, mode: str) -> tuple[str, np.ndarray]:
        """(mode actually run, tokens as int64 [B]) for a decode step, or a clear error."""
        mode = self.check_mode(mode)
        tokens = np.asarray(tokens)
        if tokens.shape != (state.batch_size,) or not np.issubdtype(tokens.dtype, np.integer):
            raise BackendError(f"step needs one integer token per sequence, shape "
                               f"({state.batch_size},); got {tokens.dtype} {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise BackendError(f"token ids outside the vocabulary "
                               f"(0..{self.config.vocab_size - 1}): {tokens.tolist()}")
        limit = self.config.max_position_embeddings
        if state.lengths.max() >= limit:
            raise BackendError(f"a sequence already holds {int(state.lengths.max())} positions: "
                               f"the model supports max_position_embeddings={limit}")
        return mode, tokens.astype(np.int64)

    def expected_cache_bytes(self, batch: int, capacity: int, itemsize: int) -> int:
        """SPEC section 4 formula for this model at this loop count."""
        cfg = self.config
        slots = capacity + (self.loops - 1) * cfg.window
        kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.head_dim * slots
        carry = 0 if cfg.is_v1 else (self.loops - 1) * batch * cfg.hidden_size
        return (kv + carry) * itemsize
