"""What the demo runs behind its page, with no Gradio in it: loaded backends, input checks,
one streaming generator per column, and the round-robin that interleaves the columns.

Each loaded backend lives on its own worker thread (a one-thread executor): that thread
loads it and makes every call into it, so one backend runs one call at a time (its
caches are not thread-safe) and always from the same thread (MLX streams are thread-local since
mlx 0.31.2). Columns hold the backend only for the length of one call, so two columns on
the same backend, or two users, interleave instead of waiting for each other, and a
client that goes away never leaves a backend locked.

Tokens/s and time to first token count only the time the backend call itself ran (on its
worker), not the time a column waited for its turn, so columns that stream together do not
dilute each other's figures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from exporters.export_store import export_root
from plt_port.checkpoint import parameter_count
from plt_port.config import MAX_LOOPS, PLTConfig
from plt_port.errors import PLTError
from plt_port.memory import FP32, available_memory_bytes
from plt_port.tokenizer import Tokenizer
from runtimes.backends.base import DECODE_MODES

log = logging.getLogger("plt_port.demo")

MAX_COLUMNS = 4
BACKEND_LABELS = {"torch": "PyTorch", "mlx": "MLX", "onnx": "ONNX Runtime"}
# Backends that export a PyTorch model dir on first use (exporters.export_store.ensure_exported).
EXPORTED_BACKENDS = {"mlx", "onnx"}
IDLE_SLEEP_S = 0.05  # a tick where every column only waited (loading): do not spin


class DemoInputError(PLTError, ValueError):
    """A request the demo refuses: the message is shown in the page as it is."""


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 512
    max_prompt_tokens: int = 1024
    concurrency: int = 2       # generations running at once (Gradio queue workers)
    queue_size: int = 32       # requests waiting beyond those; more are turned away

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


@dataclass(frozen=True)
class Request:
    prompt: str
    max_new_tokens: int
    sampling: object            # runtimes.sampling.SamplingParams
    use_chat_template: bool
    max_prompt_tokens: int


@dataclass
class ColumnView:
    text: str = ""
    stats: str = ""
    worked: bool = True   # False while the column only waits (its backend is loading)


# ---- models and backends -----------------------------------------------------------------
class BackendWorker:
    """One loaded backend and the one thread that loads it and makes every call into it."""

    def __init__(self, load: Callable[[], object], name: str, memory_bytes: int = 0):
        self.memory_bytes = memory_bytes  # estimated weight bytes, for the pool's budget
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plt-{name}")
        self.loaded: Future = self._executor.submit(load)

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the worker; return (result, seconds it ran there)."""
        def timed():
            start = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - start
        return self._executor.submit(timed).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BackendPool:
    """Backends per (model dir, backend, loops), loaded on first use and shared by every
    request; a failed load is forgotten so that the next request tries again.

    Loaded backends stay while their estimated weights fit `memory_budget` (default: half the
    memory available at start); beyond it the least recently used are dropped. A column
    still streaming on a dropped backend keeps its worker until it ends, then it is freed."""

    def __init__(self, models: dict[str, str], loader: Callable | None = None,
                 options: dict[str, dict] | None = None, memory_budget: int | None = None):
        self.models = dict(models)
        self._loader = loader
        self._options = options or {}  # backend name -> load_backend options
        self.memory_budget = available_memory_bytes() // 2 if memory_budget is None \
            else memory_budget
        self._workers: dict[tuple, BackendWorker] = {}  # least recently used first
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

    def worker(self, spec: ColumnSpec) -> BackendWorker:
        key = (self.model_dir(spec.model), spec.backend, spec.loops)
        weight_bytes = FP32 * parameter_count(self.config(spec.model))
        with self._lock:
            worker = self._workers.pop(key, None)
            failed = worker is not None and worker.loaded.done() and worker.loaded.exception()
            if worker is None or failed:
                if failed:
                    worker.close()
                worker = BackendWorker(lambda: self._load(*key), spec.backend, weight_bytes)
            self._workers[key] = worker  # now the most recently used
            self._evict_over_budget()
            return worker

    def _evict_over_budget(self) -> None:
        """Drop least recently used backends (never the newest) until the rest fit."""
        while len(self._workers) > 1 and \
                sum(w.memory_bytes for w in self._workers.values()) > self.memory_budget:
            oldest = next(iter(self._workers))
            log.info("unloading backend %s: over the memory budget", oldest)
            del self._workers[oldest]

    def loaded_keys(self) -> list[tuple]:
        """(model dir, backend, loops) of the backends held, least recently used first."""
        with self._lock:
            return list(self._workers)

    def _load(self, model_dir: str, backend: str, loops: int):
        options = self._options.get(backend, {})
        if self._loader is not None:
            return self._loader(backend, model_dir, loops=loops, **options)
        from runtimes.backends import load_backend

        return load_backend(backend, model_dir, loops=loops, **options)

    def close(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.close()
            self._workers.clear()


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
                 repetition_penalty=1.0, use_chat_template=True) -> Request:
    from runtimes.sampling import SamplingParams

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
    return Request(prompt=prompt,
                   max_new_tokens=as_int(max_new_tokens, "max new tokens", 1,
                                         limits.max_new_tokens),
                   sampling=sampling, use_chat_template=bool(use_chat_template),
                   max_prompt_tokens=limits.max_prompt_tokens)


def make_spec(pool: BackendPool, model, backend, loops, decode_mode) -> ColumnSpec:
    pool.model_dir(model)
    if decode_mode not in DECODE_MODES:
        raise DemoInputError(f"decode mode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {decode_mode!r}")
    return ColumnSpec(model=model, backend=str(backend),
                      loops=as_int(loops, "loops", 1, MAX_LOOPS), decode_mode=decode_mode)


def encode_prompt(tokenizer: Tokenizer, request: Request) -> tuple[list[int], str]:
    """(prompt ids, text shown before the completion): the chat template wraps the prompt
    when the tokenizer has one and the request asks for it; plain code completion shows the
    prompt itself, continued."""
    if request.use_chat_template and tokenizer.chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": request.prompt}]), ""
    return tokenizer.encode(request.prompt, add_bos=tokenizer.add_bos_token), request.prompt


# ---- one column --------------------------------------------------------------------------
def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class ColumnTimer:
    """Backend time of one column: first call (prefill + first token), then decode calls."""
    first_s: float | None = None
    decode_s: float = 0.0
    decode_tokens: int = 0

    def add(self, seconds: float, produced_token: bool) -> None:
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.decode_s += seconds
            self.decode_tokens += int(produced_token)

    @property
    def tokens_per_s(self) -> float | None:
        if self.decode_tokens and self.decode_s > 0:
            return self.decode_tokens / self.decode_s
        return None


def format_stats(response, timer: ColumnTimer) -> str:
    tps = timer.tokens_per_s
    parts = [f"**{tps:,.0f} tok/s**" if tps is not None else "**– tok/s**",
             f"TTFT {timer.first_s * 1000:,.0f} ms" if timer.first_s is not None else "TTFT –",
             f"cache {human_bytes(response.cache_bytes)}",
             f"{response.prompt_tokens} + {response.generation_tokens} tokens",
             f"decode {response.decode_mode}"]
    if response.peak_memory_bytes:
        parts.insert(3, f"peak {human_bytes(response.peak_memory_bytes)}")
    parts.append(f"finish: **{response.finish_reason}**" if response.finish_reason
                 else "generating…")
    return " · ".join(parts)


def error_text(exc: BaseException) -> str:
    """A readable one-liner: PLTError messages as they are, anything else with its type
    (its traceback goes to the server log, never to the page)."""
    if isinstance(exc, PLTError):
        return str(exc)
    log.error("demo column failed", exc_info=exc)
    return f"internal error ({type(exc).__name__}: {exc}); the server log has the details"


def error_view(text: str, message: str) -> ColumnView:
    return ColumnView(text=text, stats=f"⚠️ {message}")


def run_column(pool: BackendPool, spec: ColumnSpec, request: Request,
               unavailable: dict[str, str | None]) -> Iterator[ColumnView]:
    """Stream one column: a view per generated token (and while the backend loads)."""
    if spec.backend not in unavailable:
        yield error_view("", f"unknown backend {spec.backend!r}; choose from "
                             f"{', '.join(BACKEND_LABELS)}")
        return
    if unavailable[spec.backend]:
        yield error_view("", unavailable[spec.backend])
        return
    try:
        tokenizer = pool.tokenizer(spec.model)
        context = pool.config(spec.model).max_position_embeddings
        ids, shown = encode_prompt(tokenizer, request)
    except Exception as exc:
        yield error_view("", error_text(exc))
        return
    if len(ids) > request.max_prompt_tokens:
        yield error_view(shown, f"the prompt is {len(ids)} tokens long; this demo takes at most "
                                f"{request.max_prompt_tokens}")
        return
    max_new_tokens = min(request.max_new_tokens, context - len(ids))
    if max_new_tokens < 1:
        yield error_view(shown, f"the prompt ({len(ids)} tokens) fills the model's whole "
                                f"context of {context} positions")
        return

    worker = pool.worker(spec)
    while not worker.loaded.done():
        yield ColumnView(text=shown, stats=loading_message(spec), worked=False)
    if worker.loaded.exception() is not None:
        yield error_view(shown, "could not load the backend: "
                                + error_text(worker.loaded.exception()))
        return
    backend = worker.loaded.result()

    from runtimes.generate import stream_generate

    stream = stream_generate(backend, tokenizer, ids, max_new_tokens=max_new_tokens,
                             sampling=request.sampling, decode_mode=spec.decode_mode,
                             add_bos=False)
    text, timer = shown, ColumnTimer()
    try:
        while True:
            response, seconds = worker.call(next, stream, None)
            if response is None:
                return
            timer.add(seconds, response.token is not None)
            text += response.text
            yield ColumnView(text=text, stats=format_stats(response, timer))
            if response.finish_reason is not None:
                return
    except Exception as exc:
        yield error_view(text, error_text(exc))
    finally:
        worker.call(stream.close)  # on the backend's thread, like every other call into it


def loading_message(spec: ColumnSpec) -> str:
    label = BACKEND_LABELS.get(spec.backend, spec.backend)
    if spec.backend in EXPORTED_BACKENDS:
        return (f"⏳ loading {label} ({spec.loops} loops); the first use exports the model "
                f"into {export_root()}, which can take a minute…")
    return f"⏳ loading {label} ({spec.loops} loops)…"


# ---- all columns, interleaved ----------------------------------------------------------------
@dataclass
class Comparison:
    """The round-robin of FastChat's arena: one generator per column, next() on each in turn,
    every column's latest view after each round (throttled to `min_interval_s`)."""

    columns: list[Iterator[ColumnView]]
    views: list[ColumnView] = field(default_factory=list)
    min_interval_s: float = 0.05

    def __iter__(self) -> Iterator[list[ColumnView]]:
        self.views = [ColumnView(stats="⏳ waiting…") for _ in self.columns]
        live = list(range(len(self.columns)))
        last_yield = 0.0
        while live:
            worked, finished = False, False
            for i in list(live):
                try:
                    self.views[i] = next(self.columns[i])
                    worked |= self.views[i].worked
                except StopIteration:
                    live.remove(i)
                    finished = True
            now = time.perf_counter()
            if finished or not live or now - last_yield >= self.min_interval_s:
                last_yield = now
                yield list(self.views)
            if live and not worked:
                time.sleep(IDLE_SLEEP_S)

    def close(self) -> None:
        for column in self.columns:
            column.close()


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
