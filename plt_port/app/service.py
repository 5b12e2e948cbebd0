"""What the server's API routes share: errors, metrics, the model ids, and the bridge from
the event loop to `runtimes.engine.BatchEngine`.

Handlers run on the event loop and never touch a backend: `Service.submit` hands the engine
one request per choice (OpenAI's n: siblings prefilled once), whose `emit` callbacks put each
token back on the loop's queue (through a `LoopInbox`: one wake-up of the loop for the tokens
the engine sends together); a `Generation` reads them. Errors are `APIError`s, which each
API renders in its own error JSON; anything that is not the client's fault is a 500 whose
details stay in the server log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from plt_port.config import MAX_LOOPS
from plt_port.errors import PLTError
from runtimes.engine import BatchEngine, QueueFullError, Request, TokenEvent
from runtimes.generate import ContextLengthError
from runtimes.grammar import Grammar, GrammarCompiler, model_compiler
from runtimes.sampling import SamplingError, SamplingParams
from runtimes.speculative import SpeculativeStats

from .server_options import ServerOptions

log = logging.getLogger("plt_port.app.server")

MAX_STOP_STRINGS = 16  # vLLM sets no bound, OpenAI 4: this keeps vLLM clients working
MAX_STOP_CHARS = 16384  # all stop strings together (a stop string cannot outlast the context)
DISCONNECT_POLL_S = 1.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class APIError(Exception):
    """A request that fails: `type` is OpenAI's error type; the Anthropic route maps it."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, error_type, param, code


def api_error(exc: BaseException) -> APIError:
    """The client's view of an exception from the engine or the request's checks."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, SamplingError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, PLTError):
        return APIError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", "server_error")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", code="shutting_down")


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def stop_strings(stop: str | Sequence[str] | None, param: str) -> list[str]:
    """A request's stop strings, bounded in number and in total length."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(param, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    chars = sum(map(len, stop))
    if chars > MAX_STOP_CHARS:
        raise bad_request(param, f"at most {MAX_STOP_CHARS} characters of stop strings in "
                                 f"all, got {chars}")
    return stop


MAX_MESSAGES = 8192  # a chat's turns (each costs a few tokens of the template at least)


def items(item_type, max_items: int | None = None):
    """`list[item_type]` validated up to its first bad item: one error, where a plain list
    builds one per bad item (a body of a million of them, a million errors)."""
    return Annotated[list[item_type], Field(max_length=max_items, fail_fast=True)]


def mapping(value_type):
    """`dict[str, value_type]` validated up to its first bad value (as `items`)."""
    return Annotated[dict[str, value_type], Field(fail_fast=True)]


class Strict(BaseModel):
    """A request body part that refuses fields it does not define."""

    model_config = ConfigDict(extra="forbid")


class SamplingFields(Strict):
    """The sampling fields of a request body (both APIs): OpenAI's, and the extras of vLLM
    and mlx-lm (top_k, min_p, repetition_penalty); None: the default."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: mapping(float) | None = None
    top_k: int | None = None        # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None

    def sampling(self, service: "Service") -> SamplingParams:
        def given(value, default):
            return default if value is None else value

        return SamplingParams(
            temperature=given(self.temperature, 1.0), top_k=max(given(self.top_k, 0), 0),
            top_p=given(self.top_p, 1.0), min_p=given(self.min_p, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0), seed=self.seed,
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            logit_bias=service.check_logit_bias(self.logit_bias))


# ---- metrics -------------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus metrics of one server (its own registry: several servers can share a process)."""

    def __init__(self, engine: BatchEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("plt_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("plt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("plt_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("plt_time_to_first_token_seconds",
                              "From the request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("plt_time_per_output_token_seconds",
                                       "Between consecutive tokens of one sequence",
                                       buckets=LATENCY_BUCKETS, registry=r)
        Gauge("plt_running_sequences", "Sequences in the running batches",
              registry=r).set_function(lambda: engine.running_count)
        Gauge("plt_queued_sequences", "Requests waiting to join a batch",
              registry=r).set_function(lambda: engine.queued_count)
        Gauge("plt_cache_bytes", "Bytes held by the running batches' caches",
              registry=r).set_function(lambda: engine.cache_bytes)
        # the prompt cache (runtimes.prompt_cache); tokens as vLLM's prefix_cache_queries/hits
        self.prompt_cache_hits = Counter("plt_prompt_cache_hits",
                                         "Requests that started from a cached prefix", registry=r)
        self.prompt_cache_misses = Counter("plt_prompt_cache_misses",
                                           "Requests prefilled from scratch", registry=r)
        self.prompt_cache_queries = Counter("plt_prompt_cache_queried_tokens",
                                            "Prompt tokens looked up in the prompt cache",
                                            registry=r)
        self.prompt_cache_hit_tokens = Counter("plt_prompt_cache_hit_tokens",
                                               "Prompt tokens reused from the prompt cache",
                                               registry=r)
        cache = engine.prompt_cache
        Gauge("plt_prompt_cache_bytes", "Bytes held by the prompt cache's entries",
              registry=r).set_function(lambda: cache.nbytes if cache is not None else 0)
        Gauge("plt_prompt_cache_entries", "Entries of the prompt cache",
              registry=r).set_function(lambda: len(cache) if cache is not None else 0)
        # speculative decoding (runtimes.speculative), counted as requests finish
        self.speculative_drafted = Counter("plt_speculative_draft_tokens",
                                           "Draft tokens verified", registry=r)
        self.speculative_accepted = Counter("plt_speculative_accepted_tokens",
                                            "Draft tokens accepted", registry=r)
        self.speculative_verifies = Counter("plt_speculative_verify_passes",
                                            "Verify passes (prefill chunks of drafts)", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ---- one request's run ---------------------------------------------------------------------------
ChoiceEvent = tuple[int, TokenEvent]  # (choice index, token event)


@dataclass(eq=False)  # one per API call: compared and hashed by identity
class Generation:
    """The requests of one API call (one per choice) and their token events, read on the
    event loop."""

    requests: list[Request]
    events: asyncio.Queue
    metrics: ServerMetrics
    tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    last_times: list[float | None] = field(default_factory=list)
    cached_tokens: int = 0  # of the prompt, reused from the prompt cache
    speculative: SpeculativeStats | None = None  # the finished choices' (None: not speculating)
    started: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def __post_init__(self):
        n = len(self.requests)
        self.tokens, self.finish_reasons, self.last_times = [0] * n, [None] * n, [None] * n

    @property
    def finished(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    @property
    def prompt_tokens(self) -> int:
        return len(self.requests[0].prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def usage(self) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        return usage | self.speculative_usage()

    def speculative_usage(self) -> dict:
        """The usage extra of a speculating server (OpenAI's and Anthropic's usage)."""
        return {} if self.speculative is None else {"speculative": self.speculative.as_dict()}

    def anthropic_input_usage(self) -> dict:
        """Anthropic's input token counts: `input_tokens` those prefilled, the rest read from
        the prompt cache."""
        return {"input_tokens": self.prompt_tokens - self.cached_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": self.cached_tokens}

    async def next_events(self, http_request: HTTPRequest | None) -> list[ChoiceEvent]:
        """The next token and those already queued behind it (one write for them all); while
        waiting, a gone client (when `http_request` is given) cancels the request."""
        while http_request is not None:
            try:
                item = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    raise APIError(499, "the client closed the request") from None
        else:  # a stream: its response is cancelled when the client goes
            item = await self.events.get()
        events = [self.accept(*item)]
        while not self.finished and not self.events.empty():
            events.append(self.accept(*self.events.get_nowait()))
        return events

    def accept(self, choice: int, event: TokenEvent | BaseException) -> ChoiceEvent:
        if isinstance(event, BaseException):
            raise event
        self.metrics.generation_tokens.inc()
        last = self.last_times[choice]
        if last is None and choice == 0 and event.stats is not None:
            self.note_prompt_cache(event.stats.cached_tokens)
        if last is None:
            self.metrics.ttft.observe(event.time - self.requests[choice].arrived)
        else:
            self.metrics.token_latency.observe(event.time - last)
        self.last_times[choice] = event.time
        self.tokens[choice] += 1
        self.finish_reasons[choice] = event.finish_reason
        if event.finish_reason is not None and event.stats is not None \
                and event.stats.speculative is not None:
            self.note_speculative(event.stats.speculative)
        return choice, event

    def note_speculative(self, stats: SpeculativeStats) -> None:
        self.speculative = self.speculative or SpeculativeStats()
        self.speculative.add(stats)
        self.metrics.speculative_drafted.inc(stats.drafted)
        self.metrics.speculative_accepted.inc(stats.accepted)
        self.metrics.speculative_verifies.inc(stats.verifies)

    def note_prompt_cache(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens
        metrics = self.metrics
        (metrics.prompt_cache_hits if cached_tokens else metrics.prompt_cache_misses).inc()
        metrics.prompt_cache_queries.inc(self.prompt_tokens)
        metrics.prompt_cache_hit_tokens.inc(cached_tokens)

    async def stream(self, http_request: HTTPRequest | None) -> AsyncIterator[list[ChoiceEvent]]:
        try:
            while not self.finished:
                yield await self.next_events(http_request)
        finally:
            for request in self.requests:
                request.cancel()  # a no-op once finished; frees the slots of a client gone

    async def collect(self, http_request: HTTPRequest) -> list[list[TokenEvent]]:
        """Every choice's events, once all have finished."""
        choices: list[list[TokenEvent]] = [[] for _ in self.requests]
        async for events in self.stream(http_request):
            for choice, event in events:
                choices[choice].append(event)
        return choices


def skippable(event: TokenEvent) -> bool:
    """A token whose stream chunk would say nothing (text held back, not the first or last)."""
    return not event.text and event.finish_reason is None and event.index > 1


def matched_stop(tokenizer, events: Sequence[TokenEvent], stop: Sequence[str]) -> str | None:
    """The stop string that ended a sequence whose events these are (None: eos or length).
    The emitted text stops right before it: of the stop strings the full decoded text goes on
    with, the shortest (it ended first: `runtimes.sequence.StopMatcher`)."""
    if not events or events[-1].finish_reason != "stop" or not stop:
        return None
    full = tokenizer.decode([e.token for e in events])
    rest = full[len("".join(e.text for e in events)):]
    return min((s for s in stop if rest.startswith(s)), key=len, default=None)


class LoopInbox:
    """Token events from the engine thread to one event loop's queues: the events posted
    while the loop has not yet taken the earlier ones ride on one wake-up (a step's tokens
    for every stream: one `call_soon_threadsafe`, not one per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item) -> None:
        if self.loop.is_closed():  # the engine then cancels the request
            raise RuntimeError("the event loop is closed")
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # the wake-up of the first one is on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class Service:
    """The engine, the tokenizer and the model ids behind every route."""

    def __init__(self, engine: BatchEngine, tokenizer, model_name: str, options: ServerOptions):
        self.engine, self.tokenizer, self.model_name, self.options = \
            engine, tokenizer, model_name, options
        self.metrics = ServerMetrics(engine)
        self.default_loops = engine.backend.loops
        self.context = engine.backend.config.max_position_embeddings
        self.vocab_size = engine.backend.config.vocab_size
        self.max_request_bytes = options.request_bytes_limit(self.context)
        self.model_ids = {model_name: self.default_loops} | {
            f"{model_name}@loops={k}": k for k in range(1, MAX_LOOPS + 1)}
        self.created = int(time.time())
        self.compiler: GrammarCompiler | None = None
        self.generations: weakref.WeakSet[Generation] = weakref.WeakSet()  # those in flight
        self.stopping = False
        self.inbox: LoopInbox | None = None

    def inbox_of(self, loop: asyncio.AbstractEventLoop) -> LoopInbox:
        if self.inbox is None or self.inbox.loop is not loop:
            self.inbox = LoopInbox(loop)
        return self.inbox

    def stop_generations(self) -> None:
        """The server is stopping: every generation in flight ends with a 503 (a stream's
        last event) and new ones are refused."""
        self.stopping = True
        for generation in list(self.generations):
            generation.events.put_nowait((0, shutting_down()))

    def grammar_compiler(self) -> GrammarCompiler:
        """The model's grammar compiler: its vocabulary is built on the first request with
        structured output, then kept (a GrammarError when llguidance is not installed)."""
        if self.compiler is None:
            self.compiler = model_compiler(self.tokenizer, self.engine.backend)
        return self.compiler

    def model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "plt-port", "max_model_len": self.context}

    def loops_for(self, model: str | None, loops: int | None) -> int:
        model = model or self.model_name
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                                f"{', '.join(self.model_ids)}", param="model",
                           code="model_not_found")
        by_id = self.model_ids[model]
        if loops is not None and loops != by_id and model != self.model_name:
            raise bad_request("loops", f"loops={loops} contradicts the model id {model!r}")
        return loops if loops is not None else by_id

    def model_id(self, loops: int) -> str:
        return self.model_name if loops == self.default_loops \
            else f"{self.model_name}@loops={loops}"

    def check_logit_bias(self, logit_bias: dict[str, float] | None,
                         param: str = "logit_bias") -> dict[int, float]:
        """OpenAI's logit_bias (token id strings -> bias) as the sampler takes it."""
        bias = {}
        for key, value in (logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise bad_request(param, f"{key!r} is not a token id of this model "
                                         f"(0..{self.vocab_size - 1})")
            bias[int(key)] = value
        return bias

    def chat_max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        """The answer's limit: the request's, else the server's default capped by the
        context left after the prompt."""
        if requested is not None:
            return requested
        return max(min(self.options.default_max_tokens, self.context - prompt_tokens + 1), 1)

    def submit(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
               stop: Sequence[str], loops: int, n: int = 1,
               top_logprobs: int | None = None, http_request: HTTPRequest | None = None,
               max_tokens_param: str = "max_tokens", grammar: Grammar | None = None,
               ignore_eos: bool = False) -> Generation:
        """Queue n sequences of one prompt (seeds seed, seed+1, ... when a seed is given),
        each following `grammar` with its own matcher when one is given."""
        if self.stopping:
            raise shutting_down()
        if max_tokens < 1:
            raise bad_request(max_tokens_param, f"must be >= 1, got {max_tokens}")
        if not 1 <= n <= self.engine.max_batch:
            raise bad_request("n", f"must be in 1..{self.engine.max_batch} (the server's "
                                   f"--max-batch), got {n}")
        inbox = self.inbox_of(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()

        def emit_for(choice: int) -> Callable:
            return lambda event: inbox.post(events, (choice, event))

        requests = [Request(prompt_ids, max_tokens, emit_for(i),
                            sampling if sampling.seed is None or i == 0
                            else replace(sampling, seed=sampling.seed + i),
                            stop, loops, top_logprobs, grammar=grammar, ignore_eos=ignore_eos)
                    for i in range(n)]
        requests[0].siblings = requests[1:]
        self.engine.submit(requests[0])
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        generation = Generation(requests, events, self.metrics)
        self.generations.add(generation)
        if http_request is not None:
            http_request.state.generation = generation  # read by the access log
        return generation


async def off_loop(fn: Callable, *args):
    """`fn(*args)` in a worker thread: a request's chat template and tokenization (seconds for
    a long prompt) must not hold up the event loop (every other request, /health)."""
    return await asyncio.to_thread(fn, *args)


# ---- responses -----------------------------------------------------------------------------------
async def event_stream(generation: Generation, encode: Callable[[list[ChoiceEvent]], str],
                       end: Callable[[], str], encode_error: Callable[[APIError], str],
                       error_response: Callable[[APIError], Response]) -> Response:
    """Server-sent events of a generation: `encode(events)` for each batch of tokens, then
    `end()`. An error before the first token is an error response with its status (and the
    connection stays usable); after it, `encode_error(error)` is the last event."""
    tokens = generation.stream(None)
    try:
        first = await anext(tokens)
    except Exception as exc:  # noqa: BLE001
        await tokens.aclose()
        return error_response(api_error(exc))

    async def sse():
        events = first
        try:
            while True:
                data = encode(events)
                if data:
                    yield data
                if generation.finished:
                    break
                events = await anext(tokens)
            yield end()
        except Exception as exc:  # noqa: BLE001 (headers are sent: the error is an event)
            yield encode_error(api_error(exc))
        finally:
            await tokens.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def whole_response(generation: Generation, http_request: HTTPRequest,
                         final: Callable[[list[list[TokenEvent]]], dict],
                         error_response: Callable[[APIError], Response]) -> Response:
    try:
        choices = await generation.collect(http_request)
    except Exception as exc:  # noqa: BLE001
        return error_response(api_error(exc))
    return JSONResponse(final(choices))


def sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
