"""What the demo runs behind its page, with no Gradio in it: the engines, the input checks,
and the comparison that streams every column.

Each column is one request to the `runtimes.engine.BatchEngine` of its (model dir, backend):
columns on the same engine, loop count and decode mode decode together, as rows of one batch
step; other loop counts are other batches of that engine, on one copy of the weights where
the backend allows it (torch, MLX: `Backend.at_loops`). Engines load on first use, on their
own thread (the page shows the column as loading meanwhile), and stay while their estimated
weights fit the memory budget; beyond it the least recently used engine finishes what it
runs and goes.

A column's tokens/s and time to first token count only its own time (its prefill, and the
steps of its batch: `runtimes.engine.SequenceStats`), not the time other batches ran, so
columns that stream together do not dilute each other's figures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from plt_port.checkpoint import parameter_count
from plt_port.config import MAX_LOOPS, PLTConfig
from plt_port.errors import PLTError
from plt_port.memory import FP32, available_memory_bytes
from plt_port.tokenizer import Tokenizer
from runtimes.backends.base import DECODE_MODES
from runtimes.engine import BatchEngine, EngineClosedError, Request, TokenEvent
from runtimes.prompt_cache import PromptCache
from runtimes.sampling import SamplingParams
from runtimes.speculative import Speculation, SpeculativeConfig

log = logging.getLogger("plt_port.demo")

MAX_COLUMNS = 4
DRAFT = "draft "  # a column's speculative setting "draft NAME": model NAME drafts for it
BACKEND_LABELS = {"torch": "PyTorch", "mlx": "MLX", "onnx": "ONNX Runtime"}
# Backends that export a PyTorch model dir on first use (exporters.export_store.ensure_exported).
EXPORTED_BACKENDS = {"mlx", "onnx"}
POLL_S = 0.05          # how often a comparison looks at loading engines
MIN_INTERVAL_S = 0.05  # page updates at most this often (and whenever a column finishes)


class DemoInputError(PLTError, ValueError):
    """A request the demo refuses: the message is shown in the page as it is."""


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 512
    max_prompt_tokens: int = 1024
    concurrency: int = 2       # comparisons running at once (Gradio queue workers)
    queue_size: int = 32       # comparisons waiting beyond those; more are turned away

    @property
    def max_prompt_chars(self) -> int:
        """Checked before tokenising, so an enormous paste is refused cheaply."""
        return 16 * self.max_prompt_tokens


@dataclass(frozen=True)
class ColumnSpec:
    model: str          # a key of the app's models
    backend: str
    loops: int
    decode_mode: str
    speculative: str = "off"  # off, ngram or draft NAME (EnginePool.speculative_choices)


@dataclass(frozen=True)
class PromptRequest:
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    use_chat_template: bool
    max_prompt_tokens: int


@dataclass
class ColumnView:
    text: str = ""
    stats: str = ""


# ---- engines -----------------------------------------------------------------------------
class EnginePool:
    """An engine per (model dir, backend, speculative method), started on first use and
    shared by every column and user; one whose backend failed to load is forgotten, so the
    next use tries again. Speculating columns get engines of their own: an engine speculates
    for all its requests, and only while it runs one alone (`runtimes.engine`, `_speculate`),
    so beside a plain column on a shared engine a speculating one would never draft.

    Engines stay while their estimated weights fit `memory_budget` (default: half the memory
    available at start); beyond it the least recently used are drained (they finish the
    columns they run, then free their backends)."""

    def __init__(self, models: dict[str, str], loader: Callable | None = None,
                 options: dict[str, dict] | None = None, memory_budget: int | None = None,
                 max_batch: int = MAX_COLUMNS * Limits.concurrency):
        self.models = dict(models)
        self._loader = loader
        self._options = options or {}  # backend name -> load_backend options
        self.memory_budget = available_memory_bytes() // 2 if memory_budget is None \
            else memory_budget
        self.max_batch = max_batch
        self._engines: dict[tuple[str, str, str], BatchEngine] = {}  # least recently used first
        self._weight_bytes: dict[str, int] = {}  # model dir -> fp32 bytes of one copy
        self._tokenizers: dict[str, Tokenizer] = {}
        self._configs: dict[str, PLTConfig] = {}
        self._lock = threading.Lock()

    def model_dir(self, model: str) -> str:
        if model not in self.models:
            raise DemoInputError(f"unknown model {model!r}; choose from {', '.join(self.models)}")
        return self.models[model]

    def tokenizer(self, model: str) -> Tokenizer:
        with self._lock:
            if model not in self._tokenizers:
                self._tokenizers[model] = Tokenizer.from_dir(self.model_dir(model))
            return self._tokenizers[model]

    def config(self, model: str) -> PLTConfig:
        with self._lock:
            if model not in self._configs:
                self._configs[model] = PLTConfig.from_file(self.model_dir(model))
            return self._configs[model]

    def engine(self, spec: ColumnSpec) -> BatchEngine:
        """The engine of the column's (model, backend, speculative method), started (it may
        still be loading); it first loads the column's loop count."""
        key = (self.model_dir(spec.model), spec.backend, spec.speculative)
        tokenizer, config = self.tokenizer(spec.model), self.config(spec.model)
        draft = draft_model(spec.speculative)
        draft_config = self.config(draft) if draft is not None else None
        with self._lock:
            self._weight_bytes[key[0]] = FP32 * parameter_count(config)
            if draft is not None:
                self._weight_bytes[self.models[draft]] = FP32 * parameter_count(draft_config)
            engine = self._engines.pop(key, None)
            if engine is None or (engine.ready.is_set() and not engine.alive):  # failed load
                engine = BatchEngine(
                    lambda loops: self._load(*key[:2], spec.loops if loops is None else loops),
                    tokenizer, max_batch=self.max_batch, max_queue=self.max_batch,
                    prompt_cache=PromptCache(),
                    speculation=self._speculation(spec)).start(wait=False)
            self._engines[key] = engine  # now the most recently used
            self._evict_over_budget()
            return engine

    def speculative_choices(self) -> list[str]:
        """A column's speculative settings: off, ngram (prompt lookup), or a model of the
        demo drafting (same tokenizer, at its own loop count, on the column's backend)."""
        return ["off", "ngram", *(DRAFT + model for model in self.models)]

    def _speculation(self, spec: ColumnSpec) -> Speculation | None:
        """What the engine of the column's speculative setting speculates with (None: off)."""
        if spec.speculative == "off":
            return None
        draft = draft_model(spec.speculative)
        if draft is None:
            return Speculation(SpeculativeConfig(spec.speculative))
        return Speculation(SpeculativeConfig("draft", draft_model=self.models[draft]),
                           lambda model_dir, loops: self._load(model_dir, spec.backend, loops))

    def _held_bytes(self) -> int:
        """Estimated fp32 weights the engines hold: one copy per loop count loaded where the
        backend bakes the loop count in (ONNX), else one; and a drafting engine's draft."""
        return sum(self._weight_bytes[model_dir] * (
            1 if engine.backend is None or engine.backend.loops_share_weights
            else len(engine.backends)) + self._draft_bytes(speculative)
            for (model_dir, _, speculative), engine in self._engines.items())

    def _draft_bytes(self, speculative: str) -> int:
        draft = draft_model(speculative)
        return 0 if draft is None else self._weight_bytes[self.models[draft]]

    def _evict_over_budget(self) -> None:
        """Drain least recently used engines (never the newest) until the rest fit."""
        while len(self._engines) > 1 and self._held_bytes() > self.memory_budget:
            oldest = next(iter(self._engines))
            log.info("unloading %s on %s (speculative %s): over the memory budget", *oldest)
            self._engines.pop(oldest).drain()

    def loaded(self) -> list[tuple[str, str, str]]:
        """(model dir, backend, speculative method) of the engines held, least recently
        used first."""
        with self._lock:
            return list(self._engines)

    def _load(self, model_dir: str, backend: str, loops: int | None):
        options = self._options.get(backend, {})
        if self._loader is not None:
            return self._loader(backend, model_dir, loops=loops, **options)
        from runtimes.backends import load_backend

        return load_backend(backend, model_dir, loops=loops, **options)

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()


def draft_model(speculative: str) -> str | None:
    """The model a "draft NAME" setting names (None: another setting)."""
    return speculative.removeprefix(DRAFT) if speculative.startswith(DRAFT) else None


# ---- input checks ------------------------------------------------------------------------
def as_int(value, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high or number != int(number):  # range first: int(nan) raises
        raise DemoInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def as_float(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise DemoInputError(f"{name} must be between {low} and {high}, got {value!r}")
    return number


def make_request(prompt, limits: Limits, *, max_new_tokens, temperature, top_p, top_k, seed,
                 repetition_penalty=1.0, use_chat_template=True) -> PromptRequest:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoInputError("the prompt is empty: type the start of some code, or pick an example")
    if len(prompt) > limits.max_prompt_chars:
        raise DemoInputError(f"the prompt has {len(prompt)} characters; this demo takes at most "
                             f"{limits.max_prompt_chars} (about {limits.max_prompt_tokens} tokens)")
    sampling = SamplingParams(
        temperature=as_float(temperature, "temperature", 0.0, 2.0),
        top_p=as_float(top_p, "top-p", 0.01, 1.0),
        top_k=as_int(top_k, "top-k", 0, 1000),
        repetition_penalty=as_float(repetition_penalty, "repetition penalty", 1.0, 2.0),
        seed=None if seed is None or seed == "" else as_int(seed, "seed", 0, 2**31 - 1),
    )
    return PromptRequest(prompt=prompt,
                         max_new_tokens=as_int(max_new_tokens, "max new tokens", 1,
                                               limits.max_new_tokens),
                         sampling=sampling, use_chat_template=bool(use_chat_template),
                         max_prompt_tokens=limits.max_prompt_tokens)


def make_spec(pool: EnginePool, model, backend, loops, decode_mode,
              speculative=None) -> ColumnSpec:
    """A column's settings, checked; `speculative` None (a caller that does not set it) is
    off."""
    pool.model_dir(model)
    for name, value, choices in (("decode mode", decode_mode, DECODE_MODES),
                                 ("speculative", speculative or "off",
                                  pool.speculative_choices())):
        if value not in choices:
            raise DemoInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return ColumnSpec(model=model, backend=str(backend),
                      loops=as_int(loops, "loops", 1, MAX_LOOPS), decode_mode=decode_mode,
                      speculative=speculative or "off")


def encode_prompt(tokenizer: Tokenizer, request: PromptRequest) -> tuple[list[int], str]:
    """(prompt ids, text shown before the completion): the chat template wraps the prompt
    when the tokenizer has one and the request asks for it; plain code completion shows the
    prompt itself, continued."""
    if request.use_chat_template and tokenizer.chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": request.prompt}]), ""
    return tokenizer.encode(request.prompt, add_bos=tokenizer.add_bos_token), request.prompt


# ---- what a column shows -----------------------------------------------------------------
def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def decode_label(run: str, spec: ColumnSpec) -> str:
    """The decode mode the column ran, and why when it is not the one chosen."""
    if run == spec.decode_mode:
        return f"decode {run}"
    why = "one loop has no CLP" if spec.loops == 1 else "a v1 checkpoint has no CLP"
    return f"decode {run} ({why})"


def format_stats(event: TokenEvent, spec: ColumnSpec) -> str:
    stats = event.stats
    decode_tokens = event.index - 1  # the first token comes from the prefill
    tps = decode_tokens / stats.decode_s if decode_tokens and stats.decode_s > 0 else None
    parts = [f"**{tps:,.0f} tok/s**" if tps is not None else "**– tok/s**",
             f"TTFT {stats.ttft_s * 1000:,.0f} ms",
             f"cache {human_bytes(stats.cache_bytes)}",
             f"{stats.prompt_tokens} + {event.index} tokens",
             decode_label(stats.decode_mode, spec)]
    if stats.peak_memory_bytes:
        parts.insert(3, f"peak {human_bytes(stats.peak_memory_bytes)}")
    if stats.speculative is not None:
        parts.append(speculative_label(stats.speculative, spec))
    parts.append(f"finish: **{event.finish_reason}**" if event.finish_reason
                 else GENERATING)
    return " · ".join(parts)


def speculative_label(stats, spec: ColumnSpec) -> str:
    """Drafts verified and accepted so far, and tokens each verify gave (a
    runtimes.speculative.SpeculativeStats)."""
    if not stats.verifies:
        return f"{spec.speculative}: no drafts verified"
    return (f"{spec.speculative}: {stats.accepted}/{stats.drafted} drafts accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_verify:.2f} tokens/verify")


GENERATING = "generating…"
STOPPED = "⏹ stopped"
WAITING = "⏳"  # the start of a column's stats while it loads, waits or prefills


def stopped_stats(stats: str) -> str:
    """A column's stats once Stop was pressed: one still generating, loading or waiting says
    it stopped; a finished or failed one keeps its stats."""
    if stats.startswith(WAITING):
        return STOPPED
    return stats.replace(GENERATING, STOPPED)


def error_text(exc: BaseException) -> str:
    """A readable one-liner: PLTError messages as they are, anything else with its type
    (its traceback goes to the server log, never to the page)."""
    if isinstance(exc, PLTError):
        return str(exc)
    log.error("demo column failed", exc_info=exc)
    return f"internal error ({type(exc).__name__}: {exc}); the server log has the details"


def error_view(text: str, message: str) -> ColumnView:
    return ColumnView(text=text, stats=f"⚠️ {message}")


def loading_message(spec: ColumnSpec) -> str:
    label = BACKEND_LABELS.get(spec.backend, spec.backend)
    if spec.backend in EXPORTED_BACKENDS:
        return (f"⏳ loading {label} ({spec.loops} loops); the first use exports the model "
                f"into the export store, which can take a minute…")
    return f"⏳ loading {label} ({spec.loops} loops)…"


# ---- one column ----------------------------------------------------------------------------
class Column:
    """One column of a comparison: its checks, its engine request, and what it shows."""

    def __init__(self, index: int, spec: ColumnSpec, events: queue.Queue):
        self.index, self.spec, self.events = index, spec, events
        self.view = ColumnView(stats="⏳ waiting…")
        self.engine: BatchEngine | None = None
        self.request: Request | None = None
        self.prompt_ids: list[int] = []
        self.max_new_tokens = 0
        self.done = False

    def start(self, pool: EnginePool, request: PromptRequest,
              unavailable: dict[str, str | None]) -> None:
        """Check the column and start (or find) its engine; errors end the column."""
        spec = self.spec
        if spec.backend not in unavailable:
            return self.fail("", f"unknown backend {spec.backend!r}; choose from "
                                 f"{', '.join(BACKEND_LABELS)}")
        if unavailable[spec.backend]:
            return self.fail("", unavailable[spec.backend])
        try:
            context = pool.config(spec.model).max_position_embeddings
            self.prompt_ids, shown = encode_prompt(pool.tokenizer(spec.model), request)
        except Exception as exc:  # noqa: BLE001 (shown in the column)
            return self.fail("", error_text(exc))
        self.view.text = shown
        if len(self.prompt_ids) > request.max_prompt_tokens:
            return self.fail(shown, f"the prompt is {len(self.prompt_ids)} tokens long; this "
                                    f"demo takes at most {request.max_prompt_tokens}")
        self.max_new_tokens = min(request.max_new_tokens, context - len(self.prompt_ids) + 1)
        if self.max_new_tokens < 1:
            return self.fail(shown, f"the prompt ({len(self.prompt_ids)} tokens) fills the "
                                    f"model's whole context of {context} positions")
        self.engine = pool.engine(spec)

    def poll(self, request: PromptRequest) -> None:
        """Submit the request once the engine has loaded (or show why it could not)."""
        if self.done or self.request is not None or self.engine is None:
            return
        if not self.engine.ready.is_set():
            self.view.stats = loading_message(self.spec)
            return
        if self.engine.load_error is not None:
            return self.fail(self.view.text, "could not load the backend: "
                                             + error_text(self.engine.load_error))
        self.request = Request(self.prompt_ids, self.max_new_tokens,
                               lambda event: self.events.put((self.index, event)),
                               request.sampling, loops=self.spec.loops,
                               decode_mode=self.spec.decode_mode)
        try:
            self.engine.submit(self.request)
        except Exception as exc:  # noqa: BLE001 (an EngineClosedError, a prompt too long, ...)
            return self.fail(self.view.text, error_text(exc))
        self.view.stats = "⏳ prefilling…" if self.spec.loops in self.engine.backends \
            else loading_message(self.spec)

    def receive(self, event: TokenEvent | BaseException) -> None:
        if isinstance(event, EngineClosedError):
            return self.fail(self.view.text, "the backend was unloaded; run again")
        if isinstance(event, BaseException):
            return self.fail(self.view.text, error_text(event))
        self.view.text += event.text
        self.view.stats = format_stats(event, self.spec)
        self.done = event.finish_reason is not None

    def fail(self, text: str, message: str) -> None:
        self.view, self.done = error_view(text, message), True

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()


def compare(pool: EnginePool, specs: list[ColumnSpec], request: PromptRequest,
            unavailable: dict[str, str | None]) -> Iterator[list[ColumnView]]:
    """Stream every column at once: the views of all columns after each batch of tokens
    (at most every MIN_INTERVAL_S), until every column has finished. Closing the iterator
    cancels the columns still running (their slots are freed)."""
    events: queue.Queue = queue.Queue()
    columns = [Column(i, spec, events) for i, spec in enumerate(specs)]
    try:
        for column in columns:
            column.start(pool, request, unavailable)
        last_yield = 0.0
        while True:
            for column in columns:
                column.poll(request)
            finished = receive_events(columns, events)
            now = time.perf_counter()
            if finished or all(c.done for c in columns) or now - last_yield >= MIN_INTERVAL_S:
                last_yield = now
                yield [c.view for c in columns]
            if all(c.done for c in columns):
                return
    finally:
        for column in columns:
            column.cancel()


def receive_events(columns: list[Column], events: queue.Queue) -> bool:
    """Hand the events that arrive within POLL_S to their columns; whether one finished."""
    try:
        received = [events.get(timeout=POLL_S)]
    except queue.Empty:
        return False
    while not events.empty():
        received.append(events.get_nowait())
    for index, event in received:
        columns[index].receive(event)
    return any(columns[index].done for index, _ in received)


def answer_note(expected: str | None, prompt: str, text: str) -> str:
    """For a prompt whose answer is known (a variable-chain program): the answer, and whether
    the column's continuation gave it."""
    if expected is None:
        return ""
    given = text[len(prompt):].split()[:1] if text.startswith(prompt) else []
    if not given:
        return f"expected answer **{expected}**"
    verdict = "✓ right" if given[0] == expected else f"✗ wrong (gave {given[0]})"
    return f"expected answer **{expected}** · {verdict}"
