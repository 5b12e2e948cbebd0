"""The prompt cache: the states of finished requests, kept to start later requests that share
a prefix with them (mlx-lm's `LRUPromptCache`, vLLM's automatic prefix caching), and saved
prompt caches (`plt-port cache-prompt`, `--prompt-cache-file`).

A PLT prefix is more than its global K/V: the state after p tokens also holds each later
loop's ring and the CLP carry at p. An entry is therefore a whole one-sequence `DecodeState`
with the history `Backend.rewind` needs (`history_policy`): a request sharing only part of an
entry's tokens gets the entry rewound exactly to the shared prefix (undoing its journal, or
from its last snapshot before it), never a state that holds other tokens.

- `start` (the engine's admission): find the entry of this model and loop count sharing the
  longest prefix with the prompt's token ids (at most all tokens but the last, whose logits
  are needed), copy it into a state of the request's size, rewind it to the shared prefix and
  prefill only the rest; no entry shares a token: a prefill from scratch.
- `insert` (a request finished): its state holds its prompt and the answer tokens fed to the
  model, exactly where the next turn of a chat starts. An entry that the new one reaches with
  its journal (a prefix no longer than its journal goes back) is dropped as redundant.
- An LRU bounded in entries (`max_entries`, mlx-lm's --prompt-cache-size default 10) and in
  bytes (`max_bytes`, default DEFAULT_MEMORY_FRACTION of the memory available when the cache
  is made): an entry's bytes are its caches' and its history's arrays.
Entries are keyed by (model hash, loop count, dtype, KV quantization): never another loop
count's state. Entries loaded from a file are pinned (never evicted; counted in the bytes).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import numpy as np

from plt_port import prompt_cache_file
from plt_port.cache_layout import grown_capacity
from plt_port.errors import PLTError
from plt_port.memory import available_memory_bytes

from .backends.base import Backend, DecodeState
from .backends.history import HistoryPolicy

DEFAULT_MAX_ENTRIES = 10
DEFAULT_MEMORY_FRACTION = 0.25
JOURNAL_DEPTH = 256  # positions an entry rewinds by undo alone (an answer's tail, a chat turn)


class PromptCacheError(PLTError):
    """Bad prompt cache options."""


def history_policy(backend: Backend) -> HistoryPolicy:
    """What the engine's states keep: a journal of the last JOURNAL_DEPTH positions and a
    snapshot every max(256, 4 (L-1) window) positions, so that snapshots cost at most a
    quarter of the global K/V they sit beside (window 8192, L = 2: every 65,536)."""
    window = backend.config.window
    return HistoryPolicy(depth=JOURNAL_DEPTH,
                         snapshot_every=max(256, 4 * (backend.loops - 1) * window))


def model_identity(backend: Backend) -> str:
    """The hash of the model a backend loaded (`prompt_cache_file.model_hash`), once."""
    if "_model_hash" not in backend.__dict__:
        source = getattr(backend, "source_dir", backend.model_dir)
        backend._model_hash = prompt_cache_file.model_hash(source)
    return backend._model_hash


def cache_key(backend: Backend) -> dict[str, str]:
    """What an entry must match to be used by `backend` (the file metadata's names)."""
    return {"model_hash": model_identity(backend), "loops": str(backend.loops),
            "dtype": backend.run_dtype,
            "kv_quant": prompt_cache_file.kv_quant_name(backend.kv_quant)}


def history_nbytes(state: DecodeState) -> int:
    """Bytes of the arrays a state's history holds (each array counted once)."""
    if state.history is None:
        return 0
    arrays = {}
    for slot in state.history.slots:
        for item in slot.journal + slot.snapshots:
            for group in (item.ring_rows, getattr(item, "carries", None),
                          getattr(item, "carry", None)):
                for array in group or []:
                    arrays[id(array)] = array
    return sum(int(a.nbytes) for a in arrays.values())


def shared_prefix(a, b) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if len(differs) else n


@dataclass
class Entry:
    key: tuple
    tokens: tuple[int, ...]
    state: DecodeState   # one sequence, with its history
    nbytes: int
    pinned: bool = False


@dataclass
class CacheStats:
    hits: int = 0            # requests that reused a cached prefix
    misses: int = 0
    queried_tokens: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hit_tokens: int = 0      # of which reused (vLLM's prefix_cache_hits)


class PromptCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int | None = None):
        for name, value in (("prompt cache size", max_entries), ("prompt cache bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise PromptCacheError(f"{name} must be an integer >= 0, got {value!r}")
        self.max_entries = max_entries
        self.max_bytes = int(available_memory_bytes() * DEFAULT_MEMORY_FRACTION) \
            if max_bytes is None else max_bytes
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self.stats = CacheStats()
        self.files: list[str] = []  # saved prompt caches `load_files` makes pinned entries of

    def load_files(self, backend: Backend) -> None:
        """Load the saved prompt caches of `files` for `backend` (refused by name when made
        for another model, loop count, dtype or KV quantization)."""
        files, self.files = self.files, []
        for path in files:
            self.insert(backend, load_state(path, backend), pinned=True)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    # ---- admission ---------------------------------------------------------------------------
    def start(self, backend: Backend, prompt_ids: list[int], capacity: int,
              chunk_size: int | None = None) -> tuple[DecodeState, np.ndarray, int]:
        """(state of one sequence holding the prompt, logits [1, V] of its last token, the
        tokens reused from an entry rather than prefilled)."""
        if not backend.supports_rewind:
            state, logits = backend.prefill([prompt_ids], capacity, chunk_size)
            return state, logits, 0
        policy = history_policy(backend)
        entry, shared = self._longest_prefix(tuple(cache_key(backend).values()), prompt_ids)
        usable = min(shared, len(prompt_ids) - 1)
        self.stats.queried_tokens += len(prompt_ids)
        if entry is None or usable == 0:
            self.stats.misses += 1
            state, logits = backend.prefill([prompt_ids], capacity, chunk_size, history=policy)
            return state, logits, 0
        state = backend.empty_state(1, max(capacity, entry.state.capacity), policy)
        backend.write_slot(state, 0, entry.state)
        reused = backend.reusable(state, 0, usable)
        backend.rewind(state, 0, usable)
        logits = backend.extend(state, list(prompt_ids[usable:]), chunk_size)
        self.entries.move_to_end((entry.key, entry.tokens))
        self.stats.hits += 1
        self.stats.hit_tokens += reused
        return state, logits, reused

    def _longest_prefix(self, key: tuple, prompt_ids) -> tuple[Entry | None, int]:
        best, best_shared = None, 0
        for entry in self.entries.values():
            if entry.key == key:
                shared = shared_prefix(entry.tokens, prompt_ids)
                if shared > best_shared:
                    best, best_shared = entry, shared
        return best, best_shared

    # ---- entries ------------------------------------------------------------------------------
    def insert(self, backend: Backend, state: DecodeState, pinned: bool = False) -> None:
        """Keep `state` (one sequence with its history and tokens, e.g. `slot_state` of a
        finished request) as an entry; drop the entries it makes redundant, then the least
        recently used ones while the cache holds too many entries or bytes."""
        tokens = state.history.slots[0].tokens if state.history is not None else None
        if not tokens or self.max_entries == 0 or not backend.supports_rewind:
            return
        key = tuple(cache_key(backend).values())
        entry = Entry(key, tuple(tokens), state,
                      backend.cache_bytes(state) + history_nbytes(state), pinned)
        if entry.nbytes > self.max_bytes and not pinned:
            return
        journal_start = state.history.slots[0].journal_start
        for other_key, other in list(self.entries.items()):
            covered = journal_start is not None and len(other.tokens) >= journal_start
            if other.key == key and not other.pinned and covered \
                    and entry.tokens[:len(other.tokens)] == other.tokens:
                del self.entries[other_key]
        self.entries[(key, entry.tokens)] = entry
        self.entries.move_to_end((key, entry.tokens))
        self._evict()

    def _evict(self) -> None:
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            unpinned = [k for k, e in self.entries.items() if not e.pinned]
            if not unpinned:
                return
            del self.entries[unpinned[0]]

    def trim_to(self, max_bytes: int) -> None:
        """Evict least recently used entries until the cache holds at most `max_bytes`."""
        self.max_bytes = max_bytes
        self._evict()


# ---- saved prompt caches ------------------------------------------------------------------------
def save_state(path: str, backend: Backend, state: DecodeState, tokens: list[int]) -> None:
    """Write the one sequence of `state` (holding `tokens`) as a prompt cache file."""
    length = int(state.lengths[0])
    if len(tokens) != length:
        raise PromptCacheError(f"the state holds {length} tokens, {len(tokens)} given")
    metadata = prompt_cache_file.describe(model_identity(backend), backend.config,
                                          backend.loops, backend.run_dtype, backend.kv_quant,
                                          tokens)
    prompt_cache_file.write(path, backend.export_slot(state.caches, 0, length), metadata)


def load_state(path: str, backend: Backend) -> DecodeState:
    """The state of one sequence saved in `path`, with its tokens as history (an entry for
    `PromptCache.insert`); a file of another model, loop count, dtype or KV quantization is
    refused by name."""
    if not os.path.isfile(path):
        raise prompt_cache_file.PromptCacheFileError(f"prompt cache file {path} does not exist")
    arrays, metadata = prompt_cache_file.read(path)
    prompt_cache_file.check_matches(path, metadata, cache_key(backend))
    tokens = metadata["tokens"]
    capacity = grown_capacity(len(tokens), backend.config.max_position_embeddings)
    state = backend.empty_state(1, capacity, history_policy(backend))
    if backend.kv_quant is not None and "global.0.key.packed" in arrays \
            and not backend.global_quantized(state.caches):
        state.caches = backend.quantize_global(state.caches)
    state.caches = backend.import_slot(state.caches, 0, arrays)
    state.lengths[:] = len(tokens)
    state.active[:] = True
    state.history.slots[0].tokens = list(tokens)
    return state
