"""The backend contract (SPEC section 6) and the skeleton every backend shares.

A backend holds one loaded model at one inference loop count. The generate loop, the
sampler, `plt-port bench`, the demo and the server only ever talk to this surface:

    backend = load_backend("torch", model_dir, loops=2)
    state, logits = backend.prefill([[1, 5, 9], [1, 7]], max_tokens=64)   # logits [B, V] fp32
    logits = backend.step(state, np.array([4, 8]), mode="clp")            # one token per sequence
    backend.write_slot(state, 0, other_state)    # a running batch takes a prefilled sequence
    backend.free_slot(state, 1)                  # ... and lets a finished one go
    backend.cache_bytes(state)

Token ids and logits cross the boundary as numpy arrays (int64 ids, float32 logits), so the
sampler is written once. This class owns everything that is not framework code: input checks,
right-padding, chunking, picking each prompt's last-token logits, when and how far the
global cache grows, and the sequence lengths. A backend implements the hooks below on its own
cache object (the layout of `plt_port.cache_layout`).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plt_port import cache_layout
from plt_port.config import PLTConfig
from plt_port.generation_config import GenerationConfig
from plt_port.errors import PLTError

DECODE_MODES = ("clp", "naive")


class BackendError(PLTError):
    """A backend that cannot run here, or a request it cannot serve."""


@dataclass
class DecodeState:
    """Per-batch decoding state: `lengths[b]` = tokens of slot b already in the caches,
    `capacity` = global positions allocated per slot, `active[b]` = slot b holds a sequence.

    `caches` is the backend's own cache object; nothing outside the backend reads it.
    """

    lengths: np.ndarray
    capacity: int
    caches: Any
    active: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.active is None:
            self.active = np.ones(len(self.lengths), dtype=bool)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)


class Backend(abc.ABC):
    name: str = ""
    run_dtype: str = "float32"  # the dtype the weights and caches were loaded in
    # False where the loaded artefacts bake the loop count in (ONNX graphs)
    loops_share_weights: bool = True
    kv_quant: cache_layout.KVQuant | None = None  # quantized global K/V (torch, MLX)

    def __init__(self, model_dir: str, loops: int | None = None):
        self.model_dir = str(model_dir)
        self.config = PLTConfig.from_file(self.model_dir)
        self.generation_config = GenerationConfig.from_dir(self.model_dir)
        self.loops = self.config.resolve_loops(loops)

    # ---- the hooks a backend implements --------------------------------------------------
    @abc.abstractmethod
    def new_caches(self, batch: int, capacity: int) -> Any:
        """Zeroed caches for `batch` sequences of `capacity` global positions."""

    @abc.abstractmethod
    def prefill_chunk(self, caches, ids: np.ndarray, start: int, num_new: np.ndarray) -> np.ndarray:
        """Run ids [B, C] (int64) at positions start.. through every loop, writing the caches.
        Sequence b has num_new[b] real tokens in the chunk (the rest is padding, which must
        leave its ring and carry alone). Returns fp32 logits [B, V] of each sequence's token
        at index num_new[b] - 1 of the chunk (any row where num_new[b] == 0)."""

    @abc.abstractmethod
    def decode_rows(self, caches, tokens: np.ndarray, positions: np.ndarray,
                    mode: str) -> np.ndarray:
        """One token per sequence (tokens [B] int64 at positions [B]) through the L loop rows:
        in one pass ("clp") or one pass per loop ("naive"). Returns fp32 logits [B, V]."""

    @abc.abstractmethod
    def grow_caches(self, caches, capacity: int) -> Any:
        """The caches with the global K/V extended to `capacity` positions (content kept)."""

    @abc.abstractmethod
    def copy_slot(self, caches, slot: int, source_caches, source_slot: int, length: int) -> Any:
        """The caches with slot `slot` holding source slot `source_slot` (its first `length`
        global positions, its rings and its carry)."""

    @abc.abstractmethod
    def cache_nbytes(self, caches) -> int:
        """Bytes held by the caches (global KV + ring KV + CLP carry)."""

    # ---- hooks of a backend that quantizes its global K/V (`kv_quant` set) ------------------
    def global_quantized(self, caches) -> bool:
        """Whether the caches hold their global K/V quantized."""
        return False

    def quantize_global(self, caches) -> Any:
        """The caches with their global K/V quantized as `kv_quant` says (content kept)."""
        raise BackendError(f"the {self.name} backend does not quantize its KV cache")

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a sequence: config.json's and generation_config.json's."""
        return sorted(set(self.config.eos_token_ids) | set(self.generation_config.eos_token_ids))

    def peak_memory_bytes(self) -> int | None:
        """Peak memory from the framework's own counters, if it has them."""
        return None

    def release_thread(self) -> None:
        """Free what the framework keeps for the calling thread: the last call of a worker
        thread that ran this backend (MLX streams are thread-local)."""

    # ---- the contract ----------------------------------------------------------------------
    def at_loops(self, loops: int | None) -> "Backend":
        """This backend at another loop count, sharing its loaded weights (one copy in memory)."""
        if not self.loops_share_weights:
            raise BackendError(f"the {self.name} backend bakes its loop count ({self.loops}) into "
                               f"what it loaded; load it again for another loop count")
        other = copy.copy(self)
        other.loops = self.config.resolve_loops(loops)
        return other

    def empty_state(self, batch: int, capacity: int) -> DecodeState:
        """A running batch of `batch` free slots, for `write_slot` to fill."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise BackendError(f"batch must be a positive integer, got {batch!r}")
        self.check_positions(capacity)
        return DecodeState(np.zeros(batch, dtype=np.int64), capacity,
                           self.new_caches(batch, capacity), np.zeros(batch, dtype=bool))

    def prefill(self, prompts: list[list[int]], max_tokens: int,
                chunk_size: int | None = None) -> tuple[DecodeState, np.ndarray]:
        """Run the prompts through a fresh state; return it and fp32 logits [B, V] of each
        prompt's last token. `chunk_size` splits the prompts into chunks (same logits)."""
        self.check_prompts(prompts, max_tokens, chunk_size)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        longest = int(lengths.max())
        ids = np.zeros((len(prompts), longest), dtype=np.int64)  # right-padded
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = prompt
        state = DecodeState(np.zeros_like(lengths), max_tokens,
                            self.new_caches(len(prompts), max_tokens))
        logits = np.zeros((len(prompts), self.config.vocab_size), dtype=np.float32)
        chunk = chunk_size or longest
        for start in range(0, longest, chunk):
            width = min(chunk, longest - start)
            num_new = np.clip(lengths - start, 0, width)
            chunk_logits = self.prefill_chunk(state.caches, ids[:, start:start + width], start,
                                              num_new)
            self.maybe_quantize_kv(state, int((start + num_new).max()))
            ends_here = (num_new > 0) & (start + num_new == lengths)
            logits[ends_here] = chunk_logits[ends_here]
        state.lengths = lengths
        return state, logits

    def step(self, state: DecodeState, tokens, mode: str = "clp") -> np.ndarray:
        """Append one token per slot; return fp32 logits [B, V] of those tokens. Free slots
        run too (the batch keeps its shape) but stay at position 0 and keep no length."""
        return self.step_async(state, tokens, mode)()

    def step_async(self, state: DecodeState, tokens, mode: str = "clp") -> Callable[[], np.ndarray]:
        """`step`, started: returns a function that waits for the logits. A backend with an
        asynchronous device computes the step while the caller does host work (mlx-lm's
        generate_step overlap); the state may take further steps only after the wait."""
        mode, tokens = self.check_step(state, tokens, mode)
        self.ensure_capacity(state, int(state.lengths.max()) + 1)
        logits = self.start_decode_rows(state.caches, tokens, state.lengths.copy(), mode)
        state.lengths = state.lengths + state.active
        self.maybe_quantize_kv(state, int(state.lengths.max()))
        return logits

    def start_decode_rows(self, caches, tokens: np.ndarray, positions: np.ndarray,
                          mode: str) -> Callable[[], np.ndarray]:
        """`decode_rows` started; a synchronous backend has finished when it returns."""
        logits = self.decode_rows(caches, tokens, positions, mode)
        return lambda: logits

    def write_slot(self, state: DecodeState, slot: int, source: DecodeState,
                   source_slot: int = 0) -> None:
        """Put sequence `source_slot` of `source` (e.g. a fresh prefill) into slot `slot` of
        the running batch `state`, which then decodes it with the others."""
        if not 0 <= slot < state.batch_size or not 0 <= source_slot < source.batch_size:
            raise BackendError(f"slot {slot} (of {state.batch_size}) or source slot "
                               f"{source_slot} (of {source.batch_size}) out of range")
        length = int(source.lengths[source_slot])
        self.ensure_capacity(state, length)
        if self.global_quantized(source.caches) and not self.global_quantized(state.caches):
            state.caches = self.quantize_global(state.caches)  # the batch follows its newcomer
        state.caches = self.copy_slot(state.caches, slot, source.caches, source_slot, length)
        state.lengths = state.lengths.copy()
        state.lengths[slot] = length
        state.active[slot] = True

    def free_slot(self, state: DecodeState, slot: int) -> None:
        """Slot `slot` no longer holds a sequence: it stays in the batch, idle, until written."""
        if not 0 <= slot < state.batch_size:
            raise BackendError(f"slot {slot} out of range (batch of {state.batch_size})")
        state.lengths = state.lengths.copy()
        state.lengths[slot] = 0
        state.active[slot] = False

    def cache_bytes(self, state: DecodeState) -> int:
        return self.cache_nbytes(state.caches)

    def maybe_quantize_kv(self, state: DecodeState, longest: int) -> None:
        """mlx-lm's maybe_quantize_kv_cache: once a call leaves a sequence with at least
        `kv_quant.start` tokens, the batch's global K/V are quantized from then on."""
        if self.kv_quant is not None and longest >= self.kv_quant.start \
                and not self.global_quantized(state.caches):
            state.caches = self.quantize_global(state.caches)

    def quantize_kv_from_the_start(self) -> bool:
        """New caches are allocated quantized (quantized_kv_start 0)."""
        return self.kv_quant is not None and self.kv_quant.start == 0

    def ensure_capacity(self, state: DecodeState, needed: int) -> None:
        """Grow the global cache (policy: cache_layout.grown_capacity) to `needed` positions."""
        if needed > state.capacity:
            capacity = cache_layout.grown_capacity(needed, self.config.max_position_embeddings)
            state.caches = self.grow_caches(state.caches, capacity)
            state.capacity = capacity

    # ---- shared checks ---------------------------------------------------------------------
    @property
    def supports_clp(self) -> bool:
        """CLP needs the PLT one-token shift; v1 checkpoints (and L = 1) decode sequentially."""
        return not self.config.is_v1 and self.loops > 1

    def mode_run(self, mode: str) -> str:
        """The decode mode actually run for `mode`: "clp" runs as "naive" without CLP."""
        if mode not in DECODE_MODES:
            raise BackendError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        return mode if self.supports_clp else "naive"

    def check_threads(self, threads: int | None) -> int | None:
        """A CPU thread count option: None (the framework's default) or an integer >= 1."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise BackendError(f"{self.name} backend: threads must be an integer >= 1, "
                               f"got {threads!r}")
        return threads

    def check_prompts(self, prompts: list[list[int]], max_tokens: int,
                      chunk_size: int | None = None) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise BackendError(f"prefill chunk size must be a positive integer, got {chunk_size!r}")
        self.check_positions(max_tokens)
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

    def check_positions(self, max_tokens) -> None:
        """Positions to allocate per sequence: an integer in 1..max_position_embeddings."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                or max_tokens < 1:
            raise BackendError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if max_tokens > self.config.max_position_embeddings:
            raise BackendError(f"{max_tokens} positions requested, the model supports "
                               f"max_position_embeddings={self.config.max_position_embeddings}")

    def check_step(self, state: DecodeState, tokens, mode: str) -> tuple[str, np.ndarray]:
        """(mode actually run, tokens as int64 [B]) for a decode step, or a clear error."""
        mode = self.mode_run(mode)
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
        """SPEC section 4 formula for this model at this loop count: caches of `itemsize`
        bytes an element, the global K/V quantized as this backend's `kv_quant` says."""
        return cache_layout.cache_bytes(self.config, self.loops, batch, capacity, itemsize,
                                        self.kv_quant)

    @staticmethod
    def last_token_index(num_new: np.ndarray) -> np.ndarray:
        """Index in a prefill chunk of each sequence's last real token (0 where it has none)."""
        return np.maximum(num_new - 1, 0)
