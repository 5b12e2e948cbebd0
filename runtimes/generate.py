"""The generate API every backend shares (mlx-lm's `stream_generate` shape), on the engine.

One prompt, one sequence: `stream_generate` runs it on a `runtimes.engine.EngineCore` of one
slot in the calling thread (prefill, then one step per new token, each token's text made and
consumed while the next step computes). Each streamed `GenerationResponse` carries the text
delta (whole UTF-8 characters), the token and the same stats for every backend. Stop strings
are matched on the decoded text and never emitted: text that could still become a stop string
is held back until it cannot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .backends.base import Backend
from .engine import EngineCore, Request, TokenEvent
from .sampling import SamplingParams, resolve_sampling
from .sequence import (ContextLengthError, GenerateError, SequenceText, StopMatcher,
                       chat_prompt_ids, check_request, encode_prompt)
from .speculative import Speculation, SpeculativeStats

__all__ = ["ContextLengthError", "GenerateError", "GenerationResponse", "SequenceText",
           "StopMatcher", "chat_prompt_ids", "check_request", "encode_prompt", "generate",
           "stream_generate"]


@dataclass
class GenerationResponse:
    text: str                    # text delta (whole UTF-8 characters only)
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_s: float                # time to first token (prefill + first sample)
    cache_bytes: int
    peak_memory_bytes: int | None
    finish_reason: str | None    # None while running, then "stop" (eos or stop string) or "length"
    backend: str
    loops: int
    decode_mode: str             # the mode actually run ("naive" when the model has no CLP)
    speculative: SpeculativeStats | None = None  # drafts verified so far (None: not speculating)


def response(event: TokenEvent, first_token_at: float) -> GenerationResponse:
    """The response of one token: its sequence's stats; tokens after the first come from
    decode steps, so their rate since the first token is the decode speed."""
    stats, decode_s = event.stats, time.perf_counter() - first_token_at
    return GenerationResponse(
        text=event.text, token=event.token, prompt_tokens=stats.prompt_tokens,
        prompt_tps=stats.prompt_tokens / max(stats.prefill_s, 1e-9),
        generation_tokens=event.index,
        generation_tps=(event.index - 1) / decode_s if event.index > 1 and decode_s > 0 else 0.0,
        ttft_s=stats.ttft_s, cache_bytes=stats.cache_bytes,
        peak_memory_bytes=stats.peak_memory_bytes, finish_reason=event.finish_reason,
        backend=stats.backend, loops=stats.loops, decode_mode=stats.decode_mode,
        speculative=stats.speculative)


def stream_generate(backend: Backend, tokenizer, prompt: str | list[int], *,
                    max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                    stop: Sequence[str] = (), decode_mode: str = "clp",
                    prefill_chunk_size: int | None = None, add_bos: bool | None = None,
                    grammar=None, prompt_cache=None,
                    speculation: Speculation | None = None) -> Iterator[GenerationResponse]:
    """`grammar`: a `runtimes.grammar.Grammar` the answer must follow (it ends at eos once the
    grammar is complete; at max_new_tokens before that its finish_reason is "length");
    `prompt_cache`: a `runtimes.prompt_cache.PromptCache` the prompt may start from;
    `speculation`: drafts verified several tokens at a time (`runtimes.speculative`)."""
    core = EngineCore(lambda _: backend, tokenizer, max_batch=1, decode_mode=decode_mode,
                      prompt_cache=prompt_cache, speculation=speculation).open()
    if add_bos is None:
        add_bos = tokenizer.add_bos_token
    request = Request(
        encode_prompt(tokenizer, prompt, add_bos), max_new_tokens, emit=None,
        sampling=sampling or resolve_sampling(backend.generation_config.sampling_defaults()),
        stop=stop, prefill_chunk_size=prefill_chunk_size, grammar=grammar)
    first_token_at = None
    for event in core.stream(request):
        first_token_at = first_token_at or event.time
        yield response(event, first_token_at)


def generate(backend: Backend, tokenizer, prompt: str | list[int],
             **kwargs) -> tuple[str, GenerationResponse]:
    """The whole text and the last response (its stats and finish reason)."""
    pieces, last = [], None
    for last in stream_generate(backend, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
    return "".join(pieces), last
