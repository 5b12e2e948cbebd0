"""What a slot must remember to be rewound exactly (SPEC section 4, "Rewinding"): the
bookkeeping behind `Backend.rewind`, written without a framework.

A slot's state after n tokens is its global K/V (slots < n), its rings (the last `window`
K/V of loops 2..L) and its CLP carry. Rewinding to p < n keeps the global K/V as they are;
the rings and the carry need one of:

  journal    an undo log of the last `depth` positions: for each position q written, the
             ring entries its write overwrote (those of position q - window, all rings and
             layers) and the carry before it. Undoing positions n-1..p puts every ring slot
             back and takes the carry before p: exact, min(window, n - p) slot copies.
  snapshots  the rings and carry at every multiple of `snapshot_every`: restore the last
             one at s <= p, then prefill the tokens s..p-1 again (exact, at most
             snapshot_every tokens of prefill).
  tokens     the slot's token ids, so that a rewind past both can prefill again from the
             last snapshot (or from position 0).

The arrays in journal records and snapshots belong to the backend (torch tensors, MLX or
numpy arrays) and are never changed once taken, so states that share a prefix share them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from plt_port.errors import PLTError


@dataclass(frozen=True)
class HistoryPolicy:
    """How much a state remembers for rewinds: `depth` positions of undo journal (0: none),
    a snapshot at every multiple of `snapshot_every` positions (0: none). The token ids are
    always kept."""

    depth: int = 0
    snapshot_every: int = 0

    def __post_init__(self):
        for name in ("depth", "snapshot_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PLTError(f"history {name} must be an integer >= 0, got {value!r}")

    def records(self, start: int, end: int) -> int:
        """First position of [start, end) the journal must cover (end: none of them)."""
        return max(start, end - self.depth) if self.depth else end


@dataclass(frozen=True)
class JournalRecord:
    """Positions start..start+count-1 of one slot, written by one call (a prefill chunk of
    at most `window` positions, or a decode step): `ring_rows` are the backend's copies of the
    ring entries of ring slots (start + j) % window before the call, `carries[0][row, :, j]`
    the carry before position start + j (None without a carry). `row` is the slot's index in
    arrays gathered for a whole batch (axis 0)."""

    start: int
    count: int
    ring_rows: Any
    carries: Any
    row: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Snapshot:
    """A slot's rings (ring slots 0..min(window, position)-1) and carry after `position`
    tokens, as the backend gathered them; `row` indexes the gathered batch."""

    position: int
    ring_rows: Any
    carry: Any
    row: int


@dataclass
class SlotHistory:
    """One slot's journal (an unbroken run of positions up to its length), snapshots and
    token ids (None: unknown, e.g. written from a state that kept no history)."""

    tokens: list[int] | None = field(default_factory=list)
    journal: list[JournalRecord] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)

    def copy(self) -> "SlotHistory":
        tokens = list(self.tokens) if self.tokens is not None else None
        return SlotHistory(tokens, list(self.journal), list(self.snapshots))

    def owned(self, own_rows) -> "SlotHistory":
        """This history with arrays of its own (`own_rows(arrays, row)`, the backend's): a
        journal record gathered for a whole batch holds every slot's rows, which a sequence
        kept apart from its batch (a prompt-cache entry) must not keep alive."""
        def own(arrays, row):
            return own_rows(arrays, row) if arrays is not None else None

        journal = [dataclasses.replace(r, ring_rows=own(r.ring_rows, r.row),
                                       carries=own(r.carries, r.row), row=0)
                   for r in self.journal]
        snapshots = [dataclasses.replace(s, ring_rows=own(s.ring_rows, s.row),
                                         carry=own(s.carry, s.row), row=0)
                     for s in self.snapshots]
        return SlotHistory(self.tokens, journal, snapshots)

    @property
    def journal_start(self) -> int | None:
        """First position the journal can rewind to (None: empty journal)."""
        return self.journal[0].start if self.journal else None

    def record_covering(self, position: int) -> JournalRecord:
        """The journal record that holds `position` (start <= position < end)."""
        for record in reversed(self.journal):
            if record.start <= position:
                return record
        raise AssertionError(f"position {position} is before the journal")

    def last_snapshot(self, position: int) -> Snapshot | None:
        """The latest snapshot at or before `position`."""
        kept = [s for s in self.snapshots if s.position <= position]
        return kept[-1] if kept else None

    def forget_after(self, position: int) -> None:
        """Drop what was recorded about positions >= `position` (after a rewind to it)."""
        if self.tokens is not None:
            del self.tokens[position:]
        kept = []
        for record in self.journal:
            if record.end <= position:
                kept.append(record)
            elif record.start < position:
                kept.append(dataclasses.replace(record, count=position - record.start))
        self.journal = kept
        self.snapshots = [s for s in self.snapshots if s.position <= position]

    def trim(self, length: int, depth: int) -> None:
        """Keep only the journal records that hold one of the last `depth` positions."""
        while self.journal and self.journal[0].end <= length - depth:
            self.journal.pop(0)


@dataclass
class History:
    """Per-slot histories of one DecodeState under one policy."""

    policy: HistoryPolicy
    slots: list[SlotHistory]

    @classmethod
    def empty(cls, policy: HistoryPolicy, batch: int) -> "History":
        return cls(policy, [SlotHistory() for _ in range(batch)])
