"""The one engine that turns prompts into tokens: continuous batching over the backend
contract, with no HTTP in it. The server, the demo, `plt-port chat` and `stream_generate`
(so `plt-port generate`) all run on it.

`EngineCore` is the scheduler and has no thread: requests are `add`ed, and each turn is two
halves, `launch()` then `finish()`:

- launch: admit waiting requests while fewer than `max_batch` sequences run (`_admit`: each
  is prefilled alone, from the prompt cache's entry sharing its longest prefix where there is
  one (`runtimes.prompt_cache`), samples its first token and joins the running batch of its
  loop count and decode mode with `write_slot`); a finished sequence's state becomes a prompt
  cache entry; let cancelled sequences go (`free_slot`); then per
  batch hand out the tokens that end their sequence (eos, the last allowed), start one
  `backend.step_async` for the rest and, while it computes, turn their tokens into text and
  send them (`_deliver`);
- finish: wait for each step's logits, let finished sequences go, and sample every other
  sequence's next token with its own seeded `Sampler` (`_produce`).

An engine made with a `runtimes.speculative.Speculation` runs a verify of drafts in place of
a sequence's decode step while that sequence runs alone (`_speculate`, in launch: the tokens
it accepts are delivered at once, the sequence's next token is sampled from the verify).

`BatchEngine` runs an EngineCore on its own thread (it owns the backends: they are not
thread-safe, and MLX streams are thread-local); callers `submit` requests from any thread and
receive each request's tokens through its `emit` callback. `EngineCore.stream` runs one
request in the calling thread instead, pausing between the halves, so the caller consumes each
token while the next step computes (mlx-lm's overlap).

A batch is laid out as wide as the next power of two >= its sequences (each row costs a
decode row, free or not): it is re-laid out into a fresh state (`empty_state` + `write_slot`)
when it is full, or when half its width would do. Loop counts share one copy of the weights
where the backend allows it (`Backend.at_loops`: torch, MLX); ONNX graphs bake the loop count
in, so each other loop count loads (and on first use exports) its own graphs and weights.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from plt_port import cache_layout
from plt_port.errors import PLTError

from .backends.base import Backend, DecodeState
from .backends.history import HistoryPolicy
from .prompt_cache import PromptCache
from .sampling import Sampler, SamplingParams, log_softmax
from .sequence import SequenceText, check_request
from .speculative import Backoff, Speculation, SpeculativeStats, verify_drafts

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
class SequenceStats:
    """One sequence's own figures: time spent on it, not waiting for other batches."""

    backend: str
    loops: int
    decode_mode: str                # the mode run ("naive" where there is no CLP: L=1, v1)
    prompt_tokens: int
    cached_tokens: int = 0          # of the prompt, reused from the prompt cache
    prefill_s: float = 0.0          # the prefill call
    ttft_s: float = 0.0             # the prefill and the first token's sampling
    decode_s: float = 0.0           # the decode steps of its batch, launch to sampled tokens
    cache_bytes: int = 0            # its running batch's caches
    peak_memory_bytes: int | None = None
    speculative: SpeculativeStats | None = None  # None: the engine does not speculate


@dataclass
class TokenEvent:
    text: str                       # text delta (whole UTF-8 characters, stop strings cut)
    token: int
    index: int                      # 1 for the sequence's first token, then 2, 3, ...
    logprobs: TokenLogprobs | None
    finish_reason: str | None       # None while running, then "stop" or "length"
    time: float                     # time.perf_counter() when the token was sampled
    stats: SequenceStats | None = None  # the sequence's, updated in place while it runs


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
    decode_mode: str | None = None  # None: the engine's
    prefill_chunk_size: int | None = None
    grammar: object = None          # a runtimes.grammar.Grammar the answer must follow
    ignore_eos: bool = False        # eos ends nothing: max_new_tokens tokens (vLLM's ignore_eos)
    # more samples of this prompt (OpenAI's n > 1), each with its own emit, sampling and
    # grammar: prefilled once with this request, whose prompt_ids, max_new_tokens, stop,
    # ignore_eos, loops and decode mode they share
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
    last_token: int = 0             # sampled, not yet delivered (then fed to the next step)
    sampled_at: float = 0.0
    logprobs: TokenLogprobs | None = None
    stats: SequenceStats | None = None
    proposer: object = None         # its drafts' proposer (runtimes.speculative)
    backoff: Backoff | None = None  # when its drafting pays


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
    """The sequences of one loop count and decode mode, and the decode state they share
    (`slots[i]`: the sequence in slot i of the state, None where the slot is free)."""

    def __init__(self, backend: Backend, max_batch: int, mode: str = "clp"):
        self.backend = backend
        self.max_batch = max_batch
        self.mode = mode
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
        if not slots:
            return
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
            width, allocated_positions(self.backend, max(s.positions for _, s in live)),
            old_state.history.policy if old_state.history is not None else None)
        self.slots = [None] * width
        for slot, (old_slot, sequence) in enumerate(live):
            self.backend.write_slot(self.state, slot, old_state, old_slot)
            self.slots[slot] = sequence

    def step_async(self) -> Callable[[], np.ndarray]:
        """One decode step of every slot, started (`Backend.step_async`): wait for the logits."""
        tokens = np.array([s.last_token if s else 0 for s in self.slots], dtype=np.int64)
        return self.backend.step_async(self.state, tokens, self.mode)

    def slots_where(self, condition: Callable[[RunningSequence], bool]) -> list[int]:
        return [slot for slot, s in enumerate(self.slots) if s is not None and condition(s)]

    def drop_all(self) -> list[RunningSequence]:
        """Drop the state (after an error in a step, or at shutdown): the sequences it held."""
        sequences = self.sequences
        self.state, self.slots = None, []
        return sequences


@dataclass
class LaunchedStep:
    batch: RunningBatch
    logits: Callable[[], np.ndarray]
    launch_s: float                 # time spent launching it and delivering its batch's text


class EngineCore:
    """The scheduler without a thread: `open()`, `add(request, check(request))`, then turns
    (`launch()`, `finish()`) until the requests end."""

    def __init__(self, load: Callable[[int | None], Backend], tokenizer, *, max_batch: int = 16,
                 decode_mode: str = "clp", prompt_cache: PromptCache | None = None,
                 speculation: Speculation | None = None):
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self.load = load
        self.prompt_cache = prompt_cache  # None: every prompt is prefilled from scratch
        self.speculation = speculation  # None: plain decoding only
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.decode_mode = decode_mode
        self.backend: Backend | None = None  # the default loop count's
        self.backends: dict[int, Backend] = {}
        self.batches: dict[tuple[int, str], RunningBatch] = {}
        self.waiting: collections.deque[tuple[Request, int]] = collections.deque()
        self.launched: list[LaunchedStep] = []
        self.lock = threading.Lock()  # `waiting` may be filled from other threads
        self.running_count = 0
        self.cache_bytes = 0

    def open(self) -> "EngineCore":
        """Load the default backend (its loop count: what `load(None)` gives)."""
        self.backend = self._backend_for(None)
        self.tokenizer.check_fits(self.backend.config.vocab_size)
        self.backend.mode_run(self.decode_mode)
        if self.prompt_cache is not None:
            self.prompt_cache.load_files(self.backend)
        if self.speculation is not None:
            self.speculation.check_target(self.backend)
        return self

    def check(self, request: Request) -> int:
        """Positions `request` needs, or a clear error: a ConfigError for a bad loop count,
        a BackendError for a bad decode mode, a GenerateError when it cannot fit the model."""
        if self.backend is None:
            raise EngineClosedError("the engine is not running")
        self.backend.config.resolve_loops(request.loops)
        if 1 + len(request.siblings) > self.max_batch:
            raise EngineError(f"{1 + len(request.siblings)} sequences of one prompt, more than "
                              f"the {self.max_batch} this engine runs at once")
        if request.decode_mode is not None:
            self.backend.mode_run(request.decode_mode)
        return check_request(self.backend, request.prompt_ids, request.max_new_tokens)

    def add(self, request: Request, positions: int) -> None:
        with self.lock:
            self.waiting.append((request, positions))

    @property
    def idle(self) -> bool:
        return self.running_count == 0 and not self.waiting

    def turn(self) -> None:
        self.launch()
        self.finish()

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        """Run `request` to its end in the calling thread (no engine thread: a batch of one
        for `stream_generate`): its events, each yielded while the next step computes. Its
        `emit` is replaced; an error that ends it is raised."""
        events: list[TokenEvent | BaseException] = []
        request.emit = events.append
        self.add(request, self.check(request))
        try:
            while True:
                self.launch()
                for event in events:
                    if isinstance(event, BaseException):
                        raise event
                    yield event
                    if event.finish_reason is not None:
                        return
                events.clear()
                self.finish()
        finally:
            request.cancel()

    # ---- a turn ------------------------------------------------------------------------------
    def launch(self) -> None:
        if self.launched:  # a turn left half done (a stream closed early)
            self.finish()
        self._admit_waiting()
        for batch in list(self.batches.values()):
            batch.release(batch.slots_where(lambda s: s.request.cancelled.is_set()))
            if batch.state is not None:
                self._launch_step(batch)

    def finish(self) -> None:
        launched, self.launched = self.launched, []
        for step in launched:
            self._finish_step(step)
        self._count_running()
        self.cache_bytes = sum(b.backend.cache_bytes(b.state) for b in self.batches.values()
                               if b.state is not None)

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order while all of the next one's sequences fit."""
        while True:
            with self.lock:
                if not self.waiting or self.running_count + 1 + len(
                        self.waiting[0][0].siblings) > self.max_batch:
                    return
                request, positions = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            try:
                self._admit(request, positions)
            except Exception as exc:  # noqa: BLE001 (the request ends; the engine goes on)
                for each in (request, *request.siblings):
                    self._fail(each, exc)
            self._count_running()

    def _admit(self, request: Request, positions: int) -> None:
        """Prefill `request` alone, then start it and its siblings from that one prefill."""
        backend = self._backend_for(request.loops)
        mode = backend.mode_run(request.decode_mode or self.decode_mode)
        start = time.perf_counter()
        capacity = self._capacity(backend, positions)
        if self.prompt_cache is not None:
            state, logits, cached = self.prompt_cache.start(backend, request.prompt_ids, capacity,
                                                            request.prefill_chunk_size)
        else:
            state, logits = backend.prefill([request.prompt_ids], capacity,
                                            request.prefill_chunk_size, self._history())
            cached = 0
        prefill_s = time.perf_counter() - start
        key = (backend.loops, mode)
        if key not in self.batches:
            self.batches[key] = RunningBatch(backend, self.max_batch, mode)
        for each in (request, *request.siblings):
            self._join(each, request, self.batches[key], state, logits[0], positions,
                       SequenceStats(backend.name, backend.loops, mode, len(request.prompt_ids),
                                     cached, prefill_s=prefill_s,
                                     cache_bytes=backend.cache_bytes(state),
                                     peak_memory_bytes=backend.peak_memory_bytes(),
                                     speculative=None if self.speculation is None
                                     else SpeculativeStats()),
                       start)

    def _history(self) -> HistoryPolicy | None:
        """What a prefilled state keeps: the undo journal of a verify's drafts, when the
        engine speculates (the rejected ones are rewound)."""
        if self.speculation is None:
            return None
        return HistoryPolicy(depth=self.speculation.config.num_tokens + 1)

    def _join(self, request: Request, prompt: Request, batch: RunningBatch,
              prefilled: DecodeState, logits: np.ndarray, positions: int, stats: SequenceStats,
              start: float) -> None:
        """Sample `request`'s first token from its prompt's logits with its own sampler and
        join the running batch with a copy of the prefilled state (`write_slot` only reads
        `prefilled`); the token is delivered with the batch's next step."""
        backend = batch.backend
        sequence = RunningSequence(
            request, SequenceText(self.tokenizer, prompt.prompt_ids, prompt.max_new_tokens,
                                  prompt.stop, backend.eos_token_ids, prompt.ignore_eos),
            Sampler(request.sampling,
                    request.grammar.constraint() if request.grammar is not None else None),
            positions, stats=stats,
            proposer=self.speculation.proposer() if self.speculation is not None else None,
            backoff=Backoff())
        self._produce(sequence, logits)
        stats.ttft_s = sequence.sampled_at - start
        batch.add(sequence, prefilled)

    def _capacity(self, backend: Backend, positions: int) -> int:
        """Positions to allocate: rounded up where sequences join batches (a few shapes),
        exact for a batch of one, whose shape never changes."""
        return positions if self.max_batch == 1 else allocated_positions(backend, positions)

    def _produce(self, sequence: RunningSequence, logits: np.ndarray) -> int:
        """The sequence's next token from its logits [V], sampled with its own sampler."""
        token = int(sequence.sampler(logits[None], [sequence.text.history])[0])
        top_logprobs = sequence.request.top_logprobs
        sequence.logprobs = None if top_logprobs is None \
            else token_logprobs(logits, token, top_logprobs)
        sequence.last_token, sequence.sampled_at = token, time.perf_counter()
        return token

    def _deliver(self, sequence: RunningSequence) -> None:
        """Turn the sequence's sampled token into text and send it."""
        text = sequence.text.add(sequence.last_token)
        self._send(sequence.request, TokenEvent(
            text, sequence.last_token, sequence.text.generated, sequence.logprobs,
            sequence.text.finish_reason, sequence.sampled_at, sequence.stats))

    def _launch_step(self, batch: RunningBatch) -> None:
        start = time.perf_counter()
        ended = batch.slots_where(lambda s: s.text.ends_at(s.last_token))
        for slot in ended:  # never fed to a step
            self._deliver(batch.slots[slot])
        self._keep_in_prompt_cache(batch, ended)
        batch.release(ended)
        if batch.state is None or self._speculate(batch, start):
            return
        try:
            logits = batch.step_async()
        except Exception as exc:  # noqa: BLE001 (this batch's requests end; the engine goes on)
            self._fail_batch(batch, exc)
            return
        for sequence in batch.sequences:
            self._deliver(sequence)
        self.launched.append(LaunchedStep(batch, logits, time.perf_counter() - start))

    def _speculate(self, batch: RunningBatch, start: float) -> bool:
        """A verify of drafts instead of a decode step, when the engine speculates and runs
        this one sequence alone (a verify costs about L decode steps at batch 1, where a
        batch's step already shares its weight streaming), its backoff says drafting pays and
        the proposer has drafts; whether it ran. The drafts stop two tokens short of
        max_new_tokens: the last token allowed is never fed (as in plain decoding), and is the
        verify's correction or bonus."""
        if self.speculation is None or self.running_count != 1 or batch.state.batch_size != 1:
            return False
        sequence = batch.slots[0]
        if not sequence.backoff.ready():
            return False
        room = sequence.request.max_new_tokens - sequence.text.generated - 2
        k = min(self.speculation.config.num_tokens, room)

        def keep(_token: int) -> bool:
            self._deliver(sequence)
            return sequence.text.finish_reason is None

        try:
            drafts = sequence.proposer.propose(sequence.text.history + [sequence.last_token],
                                               k) if k > 0 else []
            if not drafts:
                return False
            last = sequence.last_token
            if keep(last):  # (a stop string it completes ends the sequence: no verify)
                accepted = verify_drafts(batch.backend, batch.state, last, drafts,
                                         lambda row: self._produce(sequence, row), keep)
                sequence.backoff.note(accepted, batch.backend.loops)
                for stats in (sequence.stats.speculative, self.speculation.stats):
                    stats.add(SpeculativeStats(len(drafts), accepted, 1))
        except Exception as exc:  # noqa: BLE001 (this request ends; the engine goes on)
            self._fail_batch(batch, exc)
            return True
        done = batch.slots_where(lambda s: s.text.finish_reason is not None
                                 or s.request.cancelled.is_set())
        self._settle(batch, done, 0.0, start)
        return True

    def _finish_step(self, step: LaunchedStep) -> None:
        start, batch = time.perf_counter(), step.batch
        try:
            logits = step.logits()
        except Exception as exc:  # noqa: BLE001
            self._fail_batch(batch, exc)
            return
        done = batch.slots_where(lambda s: s.text.finish_reason is not None
                                 or s.request.cancelled.is_set())
        for slot, sequence in enumerate(batch.slots):
            if sequence is not None and slot not in done:
                try:
                    self._produce(sequence, logits[slot])
                except Exception as exc:  # noqa: BLE001 (e.g. NaN logits: this sequence ends)
                    self._fail(sequence.request, exc)
                    done.append(slot)
        self._settle(batch, done, step.launch_s, start)

    def _settle(self, batch: RunningBatch, done: list[int], launch_s: float,
                start: float) -> None:
        """After a step: let the sequences in `done` go, and add the step's time (`launch_s`
        and since `start`) to the others' stats."""
        try:
            self._keep_in_prompt_cache(batch, done)
            batch.release(done)
        except Exception as exc:  # noqa: BLE001
            self._fail_batch(batch, exc)
            return
        own_s = launch_s + time.perf_counter() - start
        cache_bytes = batch.backend.cache_bytes(batch.state) if batch.state is not None else 0
        peak = batch.backend.peak_memory_bytes()
        for sequence in batch.sequences:
            sequence.stats.decode_s += own_s
            sequence.stats.cache_bytes, sequence.stats.peak_memory_bytes = cache_bytes, peak

    def _keep_in_prompt_cache(self, batch: RunningBatch, slots: Sequence[int]) -> None:
        """The states of the sequences in `slots` that finished (their prompt and the answer
        tokens fed to the model) become prompt cache entries."""
        if self.prompt_cache is None:
            return
        for slot in slots:
            if batch.slots[slot].text.finish_reason is None:
                continue
            try:
                self.prompt_cache.insert(batch.backend, batch.backend.slot_state(batch.state, slot))
            except Exception:  # noqa: BLE001 (the request is done either way)
                log.error("could not keep a finished request in the prompt cache", exc_info=True)

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

    # ---- ends ------------------------------------------------------------------------------
    def _send(self, request: Request, event: TokenEvent | BaseException) -> None:
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001 (a receiver that is gone, e.g. a closed event loop)
            request.cancel()

    def _fail(self, request: Request, exc: BaseException) -> None:
        self._send(request, exc)

    def _fail_batch(self, batch: RunningBatch, exc: BaseException) -> None:
        for sequence in batch.drop_all():
            self._fail(sequence.request, exc)

    def end_all(self, exc: BaseException) -> None:
        """End every running and waiting request with `exc`."""
        self.launched = []
        for batch in self.batches.values():
            for sequence in batch.drop_all():
                self._send(sequence.request, exc)
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for request, _ in waiting:
            for each in (request, *request.siblings):
                self._send(each, exc)
        self._count_running()
        self.cache_bytes = 0

    def _count_running(self) -> None:
        self.running_count = sum(len(b.sequences) for b in self.batches.values())


class BatchEngine(EngineCore):
    """An EngineCore on its own thread: `start()`, then `submit(request)` from any thread;
    `close()` ends every request, `drain()` ends the thread once the requests have finished."""

    def __init__(self, load: Callable[[int | None], Backend], tokenizer, *, max_batch: int = 16,
                 max_queue: int = 64, decode_mode: str = "clp",
                 prompt_cache: PromptCache | None = None,
                 speculation: Speculation | None = None):
        if max_queue < 1:
            raise EngineError(f"max_queue must be >= 1, got {max_queue}")
        super().__init__(load, tokenizer, max_batch=max_batch, decode_mode=decode_mode,
                         prompt_cache=prompt_cache, speculation=speculation)
        self.max_queue = max_queue
        self.wake = threading.Event()
        self.ready = threading.Event()  # set once the default backend loaded, or failed to
        self.stopping = False
        self.draining = False
        self.closed = False  # set once the engine thread has ended every request
        self.load_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="plt-engine", daemon=True)

    # ---- any thread ----------------------------------------------------------------------
    def start(self, wait: bool = True) -> "BatchEngine":
        """Start the engine thread, which loads the default backend; `wait`: until it has
        (its error raised here). Without waiting, `ready` and `load_error` tell."""
        self.thread.start()
        if wait:
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
        positions = self.check(request)
        with self.lock:
            if self.stopping or self.draining or self.closed:
                raise EngineClosedError("the engine is shutting down")
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

    def drain(self) -> None:
        """Take no more requests; the thread ends (releasing the backends) once those it has
        are done."""
        with self.lock:
            self.draining = True
        self.wake.set()

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.open()
        except BaseException as exc:  # noqa: BLE001 (raised again by start())
            self.load_error = exc
            self.stopping = True
        self.ready.set()
        while not self.stopping and not (self.draining and self.idle):
            self.wake.clear()
            self.turn()
            if self.idle:
                self.wake.wait(IDLE_WAIT_S)
        with self.lock:
            self.closed = True
        self.end_all(EngineClosedError("the engine is shutting down"))
        for backend in self.backends.values():
            backend.release_thread()

    def _fail(self, request: Request, exc: BaseException) -> None:
        if not isinstance(exc, PLTError):
            log.error("request failed in the engine", exc_info=exc)
        super()._fail(request, exc)
