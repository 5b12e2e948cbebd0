"""The backend contract (SPEC section 6) and the skeleton every backend shares.

A backend holds one loaded model at one inference loop count. The generate loop, the
sampler, `plt-port bench`, the demo and the server only ever talk to this surface:

    backend = load_backend("torch", model_dir, loops=2)
    state, logits = backend.prefill([[1, 5, 9], [1, 7]], max_tokens=64)   # logits [B, V] fp32
    logits = backend.step(state, np.array([4, 8]), mode="clp")            # one token per sequence
    backend.write_slot(state, 0, other_state)    # a running batch takes a prefilled sequence
    backend.free_slot(state, 1)                  # ... and lets a finished one go
    backend.cache_bytes(state)
    backend.rewind(state, 0, 2)                  # slot 0 exactly as after its first 2 tokens
    logits = backend.extend(one, [6, 2])         # a state of one sequence takes more prompt

Token ids and logits cross the boundary as numpy arrays (int64 ids, float32 logits), so the
sampler is written once. This class owns everything that is not framework code: input checks,
right-padding, chunking, picking each prompt's last-token logits, when and how far the
global cache grows, and the sequence lengths. A backend implements the hooks below on its own
cache object (the layout of `plt_port.cache_layout`).

Rewinds (`rewind`, SPEC section 4) need what a state remembers of its past: a state made
with `history=HistoryPolicy(depth, snapshot_every)` keeps an undo journal of its last `depth`
positions, snapshots of its rings and carry, and its token ids (`runtimes.backends.history`).
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
from plt_port.memory import check_thread_count

from .history import History, HistoryPolicy, JournalRecord, SlotHistory, Snapshot

DECODE_MODES = ("clp", "naive")


class BackendError(PLTError):
    """A backend that cannot run here, or a request it cannot serve."""


@dataclass
class DecodeState:
    """Per-batch decoding state: `lengths[b]` = tokens of slot b already in the caches,
    `capacity` = global positions allocated per slot, `active[b]` = slot b holds a sequence.

    `caches` is the backend's own cache object; nothing outside the backend reads it.
    `history` (None: nothing kept) is what `Backend.rewind` may use.
    """

    lengths: np.ndarray
    capacity: int
    caches: Any
    active: np.ndarray = field(default=None)
    history: History | None = None

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
    supports_rewind: bool = False  # implements the hooks of rewinds and saved prompt caches
    supports_verify: bool = False  # prefill_chunk gives every row's logits (`verify`)

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
    def prefill_chunk(self, caches, ids: np.ndarray, start: int, num_new: np.ndarray,
                      trace: bool = False):
        """Run ids [B, C] (int64) at positions start.. through every loop, writing the caches.
        Sequence b has num_new[b] real tokens in the chunk (the rest is padding, which must
        leave its ring and carry alone). Returns fp32 logits [B, V] of each sequence's token
        at index num_new[b] - 1 of the chunk (any row where num_new[b] == 0); with `trace`,
        (logits, carries): carries = [an array [B, L-1, C, d] of the backend's], [b, r-1, j]
        the carry n(h^(r)) before chunk position j (loop r's shifted input); None: no carry.
        Passed `every_row=True` (a speculative verify), the logits are [B, C, V]: every chunk
        position's (a backend without it raises BackendError naming speculative decoding)."""

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

    # ---- hooks of rewinds (SPEC section 4, "Rewinding") ------------------------------------
    # What they gather is a list of the backend's own arrays, each with the gathered slots on
    # axis 0: copies that later calls never change.
    def gather_ring(self, caches, slots: np.ndarray, ring_slots: np.ndarray) -> list | None:
        """Copies of ring entries ring_slots[i, j] of batch slot slots[i] ([k, m] ints), K and
        V of every ring and layer (None for a model without rings)."""
        raise BackendError(f"the {self.name} backend cannot rewind")

    def scatter_ring(self, caches, slot: int, ring_slots: np.ndarray, rows: list, row: int,
                     columns: np.ndarray) -> Any:
        """The caches with ring entry ring_slots[j] of `slot` set to entry (row, columns[j])
        of `rows` (from gather_ring), in every ring and layer."""
        raise BackendError(f"the {self.name} backend cannot rewind")

    def gather_carry(self, caches, slots: np.ndarray) -> list | None:
        """[a copy of the CLP carry of batch slots `slots`, [k, L-1, 1, d]] (None: no carry)."""
        raise BackendError(f"the {self.name} backend cannot rewind")

    def scatter_carry(self, caches, slot: int, carries: list | None, row: int,
                      column: int) -> Any:
        """The caches with the carry of `slot` set to carries[0][row, :, column] (carries from
        gather_carry, or a traced prefill chunk's [B, L-1, T, d]), or to zeros (None)."""
        raise BackendError(f"the {self.name} backend cannot rewind")

    def own_rows(self, arrays: list, row: int) -> list:
        """Copies of entry `row` (axis 0) of each gathered array, holding no other memory."""
        raise BackendError(f"the {self.name} backend cannot rewind")

    # ---- hooks of saved prompt caches (plt_port.prompt_cache_file's layout) ---------------
    def export_slot(self, caches, slot: int, length: int) -> dict[str, np.ndarray]:
        """Slot `slot`'s first `length` global positions, ring slots 0..min(window, length)-1
        and carry as numpy arrays named and laid out as plt_port.prompt_cache_file says."""
        raise BackendError(f"the {self.name} backend cannot save a prompt cache")

    def import_slot(self, caches, slot: int, arrays: dict[str, np.ndarray]) -> Any:
        """The caches with slot `slot` holding `arrays` (from export_slot; a quantized global
        cache needs quantized caches)."""
        raise BackendError(f"the {self.name} backend cannot load a prompt cache")

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

    def empty_state(self, batch: int, capacity: int,
                    history: HistoryPolicy | None = None) -> DecodeState:
        """A running batch of `batch` free slots, for `write_slot` to fill; `history` is what
        it keeps for rewinds (None: nothing)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise BackendError(f"batch must be a positive integer, got {batch!r}")
        self.check_positions(capacity)
        return DecodeState(np.zeros(batch, dtype=np.int64), capacity,
                           self.new_caches(batch, capacity), np.zeros(batch, dtype=bool),
                           History.empty(history, batch) if history is not None else None)

    def prefill(self, prompts: list[list[int]], max_tokens: int,
                chunk_size: int | None = None,
                history: HistoryPolicy | None = None) -> tuple[DecodeState, np.ndarray]:
        """Run the prompts through a fresh state; return it and fp32 logits [B, V] of each
        prompt's last token. `chunk_size` splits the prompts into chunks (same logits);
        `history` is what the state keeps for rewinds (None: nothing)."""
        self.check_prompts(prompts, max_tokens, chunk_size)
        state = DecodeState(np.zeros(len(prompts), dtype=np.int64), max_tokens,
                            self.new_caches(len(prompts), max_tokens))
        if history is not None:
            state.history = History.empty(history, len(prompts))
        return state, self._feed(state, prompts, chunk_size)

    def extend(self, state: DecodeState, tokens: list[int],
               chunk_size: int | None = None) -> np.ndarray:
        """Append `tokens` to the one sequence of `state` (a prompt continued from where the
        state is, e.g. after `rewind`); return fp32 logits [1, V] of the last of them."""
        if state.batch_size != 1:
            raise BackendError(f"extend takes a state of one sequence, got a batch of "
                               f"{state.batch_size}; extend it alone, then write_slot it")
        length = int(state.lengths[0])
        needed = length + len(tokens)
        self.check_prompts([tokens], self.config.max_position_embeddings - length, chunk_size)
        self.ensure_capacity(state, needed)
        state.active[0] = True
        return self._feed(state, [tokens], chunk_size)

    def verify(self, state: DecodeState, tokens: list[int]) -> np.ndarray:
        """A speculative verify: append `tokens` (the last sampled token, then the drafts) to
        the one sequence of `state` as one prefill chunk (loop r over every token after loop
        r-1: L passes); return fp32 logits [len(tokens), V], row j those a decode step of
        tokens[j] would give. `rewind` then drops the rejected tail."""
        if not self.supports_verify:
            raise BackendError(f"the {self.name} backend cannot verify drafts (speculative "
                               f"decoding needs every row's logits of a prefill chunk)")
        if state.batch_size != 1:
            raise BackendError(f"verify takes a state of one sequence, got a batch of "
                               f"{state.batch_size}")
        length = int(state.lengths[0])
        self.check_prompts([tokens], self.config.max_position_embeddings - length)
        self.ensure_capacity(state, length + len(tokens))
        return self._feed(state, [tokens], None, every_row=True)

    def _feed(self, state: DecodeState, prompts: list[list[int]],
              chunk_size: int | None, every_row: bool = False) -> np.ndarray:
        """Run `prompts` on from `start`, the length every slot of `state` has; logits of each
        prompt's last token (`every_row`, one prompt: [T, V], each of its tokens'). Records
        the journal and snapshots the history asks for."""
        start = int(state.lengths[0])
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)  # right-padded
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = prompt
        logits = np.zeros((len(prompts), self.config.vocab_size), dtype=np.float32)
        options = {"every_row": True} if every_row else {}
        chunk_rows = []
        record_from = self._record_from(state, start, lengths)
        for first, end in self._chunk_bounds(state, start, lengths, chunk_size, record_from):
            num_new = np.clip(start + lengths - first, 0, end - first)
            chunk = ids[:, first - start:end - start]
            if first >= record_from:
                chunk_logits = self._recorded_chunk(state, chunk, first, num_new, options)
            else:
                chunk_logits = self.prefill_chunk(state.caches, chunk, first, num_new, **options)
            self.maybe_quantize_kv(state, int((first + num_new).max()))
            if every_row:
                chunk_rows.append(chunk_logits[0])
            else:
                ends_here = (num_new > 0) & (first + num_new == start + lengths)
                logits[ends_here] = chunk_logits[ends_here]
            self._snapshot_at_multiples(state, first + num_new, num_new > 0)
        state.lengths = start + lengths
        if state.history is not None:
            for slot, prompt in zip(state.history.slots, prompts):
                if slot.tokens is not None:
                    slot.tokens.extend(int(t) for t in prompt)
        return np.concatenate(chunk_rows) if every_row else logits

    def _record_from(self, state: DecodeState, start: int, lengths: np.ndarray) -> int:
        """First position of a prompt run that the journal records (the run's end: none)."""
        end = start + int(lengths.max())
        if state.history is None or not self.loops > 1:
            return end
        return min(state.history.policy.records(start, start + int(n)) for n in lengths)

    def _chunk_bounds(self, state: DecodeState, start: int, lengths: np.ndarray,
                      chunk_size: int | None, record_from: int) -> list[tuple[int, int]]:
        """[first, end) of each prefill chunk: `chunk_size` apart, cut at every snapshot
        position, and at most a ring's slots wide where the journal records (a chunk's undo
        entries are the ring entries from before it)."""
        end = start + int(lengths.max())
        cuts = set(range(start, end, chunk_size or end - start))
        if state.history is not None:
            every = state.history.policy.snapshot_every
            if every:
                cuts.update(range(-(-start // every) * every, end, every))
            ring = cache_layout.ring_slots(self.config.window, state.capacity)
            cuts.update(range(record_from, end, ring))
        cuts = sorted(c for c in cuts if start <= c < end)
        return list(zip(cuts, cuts[1:] + [end]))

    def _recorded_chunk(self, state: DecodeState, ids: np.ndarray, first: int,
                        num_new: np.ndarray, options: dict) -> np.ndarray:
        """A prefill chunk of at most a ring's width whose undo entries go into the journal."""
        batch = np.arange(state.batch_size)
        ring_slots = cache_layout.ring_slot(np.arange(first, first + ids.shape[1]),
                                            self.config.window)
        rows = self.gather_ring(state.caches, batch, np.broadcast_to(ring_slots,
                                                                     (len(batch), len(ring_slots))))
        logits, carries = self.prefill_chunk(state.caches, ids, first, num_new, trace=True,
                                             **options)
        for b in np.flatnonzero(num_new > 0):
            self._journal(state, b, JournalRecord(first, int(num_new[b]), rows, carries, int(b)))
        return logits

    def _journal(self, state: DecodeState, slot: int, record: JournalRecord) -> None:
        history = state.history.slots[slot]
        if history.journal and history.journal[-1].end != record.start:
            history.journal.clear()  # the journal is one unbroken run of positions
        history.journal.append(record)
        history.trim(record.end, state.history.policy.depth)

    def _snapshot_at_multiples(self, state: DecodeState, lengths: np.ndarray,
                               moved: np.ndarray) -> None:
        """Snapshot each slot that moved and now ends at a multiple of `snapshot_every`."""
        if state.history is None or not state.history.policy.snapshot_every or self.loops == 1:
            return
        every = state.history.policy.snapshot_every
        for slot in np.flatnonzero(moved & (lengths % every == 0)):
            state.history.slots[slot].snapshots.append(
                self._snapshot(state.caches, int(slot), int(lengths[slot])))

    def _snapshot(self, caches, slot: int, position: int) -> Snapshot:
        held = np.arange(min(self.config.window, position))[None]
        slots = np.array([slot])
        return Snapshot(position, self.gather_ring(caches, slots, held),
                        self.gather_carry(caches, slots), 0)

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
        positions = state.lengths.copy()
        undo = self._step_undo_entries(state, positions)
        logits = self.start_decode_rows(state.caches, tokens, positions, mode)
        state.lengths = state.lengths + state.active
        self.maybe_quantize_kv(state, int(state.lengths.max()))
        if state.history is not None:
            self._note_step(state, tokens, positions, undo)
        return logits

    def _step_undo_entries(self, state: DecodeState, positions: np.ndarray):
        """(ring rows, carries) a step overwrites, when the journal records (else None)."""
        if state.history is None or not state.history.policy.depth or self.loops == 1:
            return None
        batch = np.arange(state.batch_size)
        ring_slots = cache_layout.ring_slot(positions, self.config.window)[:, None]
        return (self.gather_ring(state.caches, batch, ring_slots),
                self.gather_carry(state.caches, batch))

    def _note_step(self, state: DecodeState, tokens: np.ndarray, positions: np.ndarray,
                   undo) -> None:
        for slot in np.flatnonzero(state.active):
            history = state.history.slots[slot]
            if history.tokens is not None:
                history.tokens.append(int(tokens[slot]))
            if undo is not None:
                self._journal(state, slot, JournalRecord(int(positions[slot]), 1, *undo,
                                                         int(slot)))
        self._snapshot_at_multiples(state, state.lengths, state.active)

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
        if state.history is not None:  # a source without history: its tokens are unknown
            state.history.slots[slot] = source.history.slots[source_slot].copy() \
                if source.history is not None else SlotHistory(tokens=None)

    def free_slot(self, state: DecodeState, slot: int) -> None:
        """Slot `slot` no longer holds a sequence: it stays in the batch, idle, until written."""
        if not 0 <= slot < state.batch_size:
            raise BackendError(f"slot {slot} out of range (batch of {state.batch_size})")
        state.lengths = state.lengths.copy()
        state.lengths[slot] = 0
        state.active[slot] = False
        if state.history is not None:
            state.history.slots[slot] = SlotHistory()

    def slot_state(self, state: DecodeState, slot: int) -> DecodeState:
        """A state of one sequence holding a copy of slot `slot` (its caches, as few global
        positions as its length needs, and its history)."""
        capacity = cache_layout.grown_capacity(max(int(state.lengths[slot]), 1),
                                               self.config.max_position_embeddings)
        one = self.empty_state(1, capacity, state.history.policy if state.history else None)
        self.write_slot(one, 0, state, slot)
        if one.history is not None:
            one.history.slots[0] = one.history.slots[0].owned(self.own_rows)
        return one

    # ---- rewinds (SPEC section 4, "Rewinding") ---------------------------------------------
    def rewind(self, state: DecodeState, slot: int, position: int) -> None:
        """Make slot `slot` exactly what it was after its first `position` tokens, undoing
        its journal where it reaches back that far (min(window, length - position) ring-entry
        copies: the cheap path, e.g. the rejected drafts of a speculative step); else from its
        last snapshot at or before `position` (or from the start) by prefilling its tokens
        again; the global K/V are kept (slots >= position are written again later)."""
        length = int(state.lengths[slot]) if 0 <= slot < state.batch_size else -1
        if length < 0 or isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                or not 0 <= position <= length:
            raise BackendError(f"rewind of slot {slot} (of {state.batch_size}) to position "
                               f"{position!r}: needs 0 <= position <= its length {length}")
        position = int(position)
        history = state.history.slots[slot] if state.history is not None else None
        path = self._rewind_path(length, position, history)
        if path == "length":
            self._set_length(state, slot, position, history)
            if position == 0 and self.supports_clp:  # a fresh sequence's shifted input is 0
                state.caches = self.scatter_carry(state.caches, slot, None, 0, 0)
        elif path == "undo":
            self._undo(state, slot, position, history)
        elif path == "again":
            self._prefill_again(state, slot, position, history)
        else:
            raise BackendError(f"slot {slot} holds {length} tokens and keeps no history that "
                               f"reaches back to position {position}: make the state with "
                               f"history=HistoryPolicy(...) to rewind it")

    def reusable(self, state: DecodeState, slot: int, position: int) -> int:
        """How many of its first `position` tokens a rewind of `slot` keeps without running
        them again: `position`, or the snapshot position it prefills again from (0: none)."""
        history = state.history.slots[slot] if state.history is not None else None
        if self._rewind_path(int(state.lengths[slot]), position, history) != "again":
            return position
        snapshot = history.last_snapshot(position)
        return snapshot.position if snapshot is not None else 0

    def _rewind_path(self, length: int, position: int, history: SlotHistory | None) -> str:
        """How a rewind from `length` to `position` runs: "length" (only the length changes:
        to the start, or nothing to restore), "undo" (the journal reaches back that far),
        "again" (prefill its tokens again), or "none" (no history to do it with)."""
        if position in (0, length) or not self._rewind_restores(length):
            return "length"
        if history is None:
            return "none"
        if history.journal_start is not None and history.journal_start <= position:
            return "undo"
        return "again" if history.tokens is not None else "none"

    def _rewind_restores(self, length: int) -> bool:
        """Whether rewinding a sequence of `length` tokens needs more than a new length: a
        CLP carry to take back, or rings that have wrapped (a ring of length <= window holds
        position q in slot q, so forgetting slots >= position is enough)."""
        return self.supports_clp or (self.loops > 1 and length > self.config.window)

    @staticmethod
    def _set_length(state: DecodeState, slot: int, position: int,
                    history: SlotHistory | None) -> None:
        state.lengths = state.lengths.copy()
        state.lengths[slot] = position
        if history is not None:
            history.forget_after(position)

    def _undo(self, state: DecodeState, slot: int, position: int, history: SlotHistory) -> None:
        """Put back the ring entries that positions position.. overwrote, latest record first
        (so a ring slot written twice ends with its oldest undo entry), and the carry."""
        window = self.config.window
        for record in reversed(history.journal):
            if record.end <= position:
                break
            first = max(record.start, position)
            if first >= position + window:
                continue  # its slots are restored by the entries a window earlier
            columns = np.arange(first - record.start, record.count)
            state.caches = self.scatter_ring(state.caches, slot,
                                             cache_layout.ring_slot(record.start + columns, window),
                                             record.ring_rows, record.row, columns)
        if self.supports_clp:
            record = history.record_covering(position)
            state.caches = self.scatter_carry(state.caches, slot, record.carries, record.row,
                                              position - record.start)
        self._set_length(state, slot, position, history)

    def restore_snapshot(self, state: DecodeState, slot: int, snapshot: Snapshot) -> None:
        """Slot `slot` as it was when `snapshot` was taken of it (its global K/V below the
        snapshot's position unchanged since)."""
        held = np.arange(min(self.config.window, snapshot.position))
        state.caches = self.scatter_ring(state.caches, slot, held, snapshot.ring_rows,
                                         snapshot.row, held)
        if self.supports_clp:
            state.caches = self.scatter_carry(state.caches, slot, snapshot.carry, snapshot.row, 0)
        self._set_length(state, slot, snapshot.position,
                         state.history.slots[slot] if state.history is not None else None)

    def snapshot(self, state: DecodeState, slot: int) -> Snapshot:
        """The rings and carry of slot `slot` at its length, for `restore_snapshot`."""
        return self._snapshot(state.caches, slot, int(state.lengths[slot]))

    def _prefill_again(self, state: DecodeState, slot: int, position: int,
                       history: SlotHistory) -> None:
        """Restore the last snapshot at or before `position` (none: the start) and prefill the
        slot's tokens from there (in a state of its own when the batch holds others)."""
        if state.batch_size > 1:
            one = self.slot_state(state, slot)
            self._prefill_again(one, 0, position, one.history.slots[0])
            self.write_slot(state, slot, one)
            return
        snapshot = history.last_snapshot(position)
        tokens = history.tokens[:position]
        if snapshot is None:
            self.rewind(state, slot, 0)
        else:
            self.restore_snapshot(state, slot, snapshot)
        resumed = int(state.lengths[slot])
        if position > resumed:
            self.extend(state, tokens[resumed:])

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
        """A CPU thread count option: None (the framework's default) or 1 to the usable cores."""
        if threads is not None:
            check_thread_count(threads, f"{self.name} backend: threads", BackendError)
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
