"""Continuous batching over the backend contract, with no HTTP in it (the server's engine).

One thread owns the backends (they are not thread-safe, and MLX streams are thread-local):
callers `submit` requests into a bounded queue and receive each request's tokens through its
`emit` callback, called on the engine thread. Each turn of the engine thread:

1. admits waiting requests while fewer than `max_batch` sequences run: each is prefilled
   alone (`backend.prefill([ids], positions)`), samples its first token, and joins the
   running batch of its loop count (`write_slot`);
2. lets cancelled sequences go (`free_slot`);
3. runs one `backend.step` per loop count, which serves every running sequence of that loop
   count, samples each row with the sequence's own seeded `Sampler`, and lets finished
   sequences go.

A batch is laid out as wide as the next power of two >= its sequences (each row costs a
decode row, free or not): it is re-laid out into a fresh state (`empty_state` + `write_slot`)
when it is full, or when half its width would do.

Loop counts share one copy of the weights where the backend allows it (`Backend.at_loops`:
torch, MLX); ONNX graphs bake the loop count in, so each other loop count loads (and on
first use exports) its own graphs and weights, on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from plt_port import cache_layout
from plt_port.errors import PLTError

from .backends.base import Backend, DecodeState
from .generate import SequenceText, check_request
from .sampling import Sampler, SamplingParams, log_softmax

log = logging.getLogger("plt_port.engine")

IDLE_WAIT_S = 1.0


class EngineError(PLTError):
    """A request the engine cannot take now."""


class QueueFullError(EngineError):
    pass


class EngineClosedError(EngineError):
    pass


@dataclass
class TokenLogprobs:
    logprob: float                  # log-probability of the chosen token under the model
    top: list[tuple[int, float]]    # (token, log-probability) of the most likely tokens


@dataclass
class TokenEvent:
    text: str                       # text delta (whole UTF-8 characters, stop strings cut)
    token: int
    index: int                      # 1 for the sequence's first token, then 2, 3, ...
    logprobs: TokenLogprobs | None
    finish_reason: str | None       # None while running, then "stop" or "length"
    time: float                     # time.perf_counter() when the token was sampled


@dataclass
class Request:
    """A generation request; `emit` receives a TokenEvent per token, or the exception that
    ended the request (an EngineClosedError when the engine shuts down)."""

    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[TokenEvent | BaseException], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    loops: int | None = None        # None: the default backend's loop count
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k
    grammar: object = None          # a runtimes.grammar.Grammar the answer must follow
    # more samples of this prompt (OpenAI's n > 1), each with its own emit and sampling:
    # prefilled once with this request, whose prompt_ids, max_new_tokens, stop and loops they share
    siblings: Sequence["Request"] = ()
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away: the engine lets the sequence go at its next turn."""
        self.cancelled.set()


@dataclass
class RunningSequence:
    request: Request
    text: SequenceText
    sampler: Sampler
    positions: int                  # positions the whole answer needs
    last_token: int = 0


def batch_width(sequences: int, max_batch: int) -> int:
    """Rows of a batch of `sequences` sequences: the next power of two, at most max_batch."""
    return min(1 << max(sequences - 1, 0).bit_length(), max_batch)


def allocated_positions(backend: Backend, positions: int) -> int:
    """Global positions to allocate for `positions`: rounded up like cache growth, so that
    batches keep a few shapes (MLX traces its compiled step again for each new shape)."""
    return cache_layout.grown_capacity(positions, backend.config.max_position_embeddings)


def token_logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprobs:
    """Log-probabilities under the model's own distribution (before any sampling filter)."""
    logprobs = log_softmax(logits)
    top = np.argsort(-logprobs, kind="stable")[:k]
    return TokenLogprobs(float(logprobs[token]), [(int(t), float(logprobs[t])) for t in top])


class RunningBatch:
    """The sequences of one loop count and the decode state they share
    (`slots[i]`: the sequence in slot i of the state, None where the slot is free)."""

    def __init__(self, backend: Backend, max_batch: int):
        self.backend = backend
        self.max_batch = max_batch
        self.state: DecodeState | None = None
        self.slots: list[RunningSequence | None] = []

    @property
    def sequences(self) -> list[RunningSequence]:
        return [s for s in self.slots if s is not None]

    def add(self, sequence: RunningSequence, prefilled: DecodeState) -> None:
        if self.state is None:  # the prefill's own state is a batch of one
            self.state, self.slots = prefilled, [sequence]
            return
        if None not in self.slots:
            self.relayout(batch_width(len(self.slots) + 1, self.max_batch))
        slot = self.slots.index(None)
        self.backend.ensure_capacity(self.state, allocated_positions(self.backend,
                                                                     sequence.positions))
        self.backend.write_slot(self.state, slot, prefilled)
        self.slots[slot] = sequence

    def release(self, slots: Sequence[int]) -> None:
        """Let the sequences in `slots` go; narrow the batch when half of it would do."""
        for slot in slots:
            self.backend.free_slot(self.state, slot)
            self.slots[slot] = None
        live = len(self.sequences)
        if live == 0:
            self.state, self.slots = None, []
        elif batch_width(live, self.max_batch) <= len(self.slots) // 2:
            self.relayout(batch_width(live, self.max_batch))

    def relayout(self, width: int) -> None:
        """Copy the running sequences into the first slots of a fresh state `width` wide."""
        old_state, live = self.state, [(i, s) for i, s in enumerate(self.slots) if s is not None]
        self.state = self.backend.empty_state(
            width, allocated_positions(self.backend, max(s.positions for _, s in live)))
        self.slots = [None] * width
        for slot, (old_slot, sequence) in enumerate(live):
            self.backend.write_slot(self.state, slot, old_state, old_slot)
            self.slots[slot] = sequence

    def step(self, mode: str) -> np.ndarray:
        tokens = np.array([s.last_token if s else 0 for s in self.slots], dtype=np.int64)
        return self.backend.step(self.state, tokens, mode)

    def drop_all(self) -> list[RunningSequence]:
        """Drop the state (after an error in a step, or at shutdown): the sequences it held."""
        sequences = self.sequences
        self.state, self.slots = None, []
        return sequences


class BatchEngine:
    """`start()`, then `submit(request)` from any thread; `close()` ends every request."""

    def __init__(self, load: Callable[[int | None], Backend], tokenizer, *, max_batch: int = 16,
                 max_queue: int = 64, decode_mode: str = "clp"):
        if max_batch < 1 or max_queue < 1:
            raise EngineError(f"max_batch and max_queue must be >= 1, got {max_batch}, "
                              f"{max_queue}")
        self.load = load
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.decode_mode = decode_mode
        self.backend: Backend | None = None  # the default loop count's
        self.backends: dict[int, Backend] = {}
        self.batches: dict[int, RunningBatch] = {}
        self.waiting: collections.deque[tuple[Request, int]] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.ready = threading.Event()
        self.stopping = False
        self.closed = False  # set once the engine thread has ended every request
        self.load_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="plt-engine", daemon=True)
        self.running_count = 0
        self.cache_bytes = 0

    # ---- any thread ----------------------------------------------------------------------
    def start(self) -> "BatchEngine":
        """Start the engine thread and load the default backend on it (errors raised here)."""
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error
        return self

    @property
    def queued_count(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, request: Request) -> None:
        """Queue `request`, or raise: a GenerateError when it cannot fit the model, a
        ConfigError for a bad loop count, QueueFullError, EngineClosedError."""
        if self.backend is None:
            raise EngineClosedError("the engine is not running")
        self.backend.config.resolve_loops(request.loops)
        if 1 + len(request.siblings) > self.max_batch:
            raise EngineError(f"{1 + len(request.siblings)} sequences of one prompt, more than "
                              f"the {self.max_batch} this engine runs at once")
        positions = check_request(self.backend, request.prompt_ids, request.max_new_tokens)
        with self.lock:
            if self.stopping or self.closed:
                raise EngineClosedError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests already wait; try again later")
            self.waiting.append((request, positions))
        self.wake.set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the current step; running and waiting requests end with EngineClosedError."""
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.backend = self._backend_for(None)
        except BaseException as exc:  # noqa: BLE001 (raised again by start())
            self.load_error = exc
            self.stopping = True
        self.ready.set()
        while not self.stopping:
            self.wake.clear()
            self._admit()
            for batch in list(self.batches.values()):
                self._drop_cancelled(batch)
                if batch.state is not None:
                    self._step(batch)
            self._publish_stats()
            if self.running_count == 0 and not self.waiting:
                self.wake.wait(IDLE_WAIT_S)
        self._end_all(EngineClosedError("the server is shutting down"))
        for backend in self.backends.values():
            backend.release_thread()

    def _backend_for(self, loops: int | None) -> Backend:
        default = self.backend
        if default is None:
            backend = self.load(loops)
        else:
            loops = default.config.resolve_loops(loops if loops is not None else default.loops)
            if loops in self.backends:
                return self.backends[loops]
            backend = default.at_loops(loops) if default.loops_share_weights else self.load(loops)
        self.backends[backend.loops] = backend
        return backend

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting or self.running_count + 1 + len(
                        self.waiting[0][0].siblings) > self.max_batch:
                    return
                request, positions = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            try:
                self._start(request, positions)
            except Exception as exc:  # noqa: BLE001 (the request ends; the engine goes on)
                for each in (request, *request.siblings):
                    self._fail(each, exc)

    def _start(self, request: Request, positions: int) -> None:
        backend = self._backend_for(request.loops)
        state, logits = backend.prefill([request.prompt_ids],
                                        allocated_positions(backend, positions))
        self._fan_out(request, backend, state, logits[0], positions)

    def _fan_out(self, request: Request, backend: Backend, prefilled: DecodeState,
                 logits: np.ndarray, positions: int) -> None:
        """Start the request and its siblings from one prefill: each samples its first token
        from the same logits with its own sampler and, unless that ends it, joins the batch
        with a copy of the prefilled state (`write_slot` reads `prefilled`, never changes it)."""
        for each in (request, *request.siblings):
            sequence = RunningSequence(
                each, SequenceText(self.tokenizer, request.prompt_ids, request.max_new_tokens,
                                   request.stop, backend.eos_token_ids),
                Sampler(each.sampling,
                        each.grammar.constraint() if each.grammar is not None else None),
                positions)
            if self._emit(sequence, logits):
                batch = self.batches.setdefault(backend.loops,
                                                RunningBatch(backend, self.max_batch))
                batch.add(sequence, prefilled)
                self._count_running()

    def _step(self, batch: RunningBatch) -> None:
        try:
            logits = batch.step(self.decode_mode)
            done = [slot for slot, sequence in enumerate(batch.slots)
                    if sequence is not None and not self._emit(sequence, logits[slot])]
            batch.release(done)
        except Exception as exc:  # noqa: BLE001 (this batch's requests end; the engine goes on)
            for sequence in batch.drop_all():
                self._fail(sequence.request, exc)
        self._count_running()

    def _emit(self, sequence: RunningSequence, logits: np.ndarray) -> bool:
        """Sample and send one token; whether the sequence goes on."""
        request = sequence.request
        token = int(sequence.sampler(logits[None], [sequence.text.history])[0])
        text = sequence.text.add(token)
        logprobs = None if request.top_logprobs is None \
            else token_logprobs(logits, token, request.top_logprobs)
        sequence.last_token = token
        self._send(request, TokenEvent(text, token, sequence.text.generated, logprobs,
                                       sequence.text.finish_reason, time.perf_counter()))
        return sequence.text.finish_reason is None and not request.cancelled.is_set()

    def _drop_cancelled(self, batch: RunningBatch) -> None:
        cancelled = [slot for slot, sequence in enumerate(batch.slots)
                     if sequence is not None and sequence.request.cancelled.is_set()]
        if cancelled:
            batch.release(cancelled)
            self._count_running()

    def _send(self, request: Request, event: TokenEvent | BaseException) -> None:
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001 (a receiver that is gone, e.g. a closed event loop)
            request.cancel()

    def _fail(self, request: Request, exc: BaseException) -> None:
        if not isinstance(exc, PLTError):
            log.error("request failed in the engine", exc_info=exc)
        self._send(request, exc)

    def _end_all(self, exc: BaseException) -> None:
        for batch in self.batches.values():
            for sequence in batch.drop_all():
                self._send(sequence.request, exc)
        with self.lock:
            self.closed = True
            waiting, self.waiting = list(self.waiting), collections.deque()
        for request, _ in waiting:
            for each in (request, *request.siblings):
                self._send(each, exc)
        self._count_running()
        self._publish_stats()

    def _count_running(self) -> None:
        self.running_count = sum(len(b.sequences) for b in self.batches.values())

    def _publish_stats(self) -> None:
        self.cache_bytes = sum(b.backend.cache_bytes(b.state) for b in self.batches.values()
                               if b.state is not None)
