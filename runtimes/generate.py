"""The generate loop every backend shares (mlx-lm's `stream_generate` shape).

One prompt, one sequence: prefill, then one `backend.step` per new token. Each streamed
`GenerationResponse` carries the text delta (whole UTF-8 characters), the token and the same
stats for every backend. Stop strings are matched on the decoded text and never emitted:
text that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from plt_port.errors import PLTError
from plt_port.memory import FP32, check_fits

from .base import Backend
from .sampling import Sampler, SamplingParams, resolve_sampling


class GenerateError(PLTError, ValueError):
    """A generate request that cannot run (empty prompt, bad limits)."""


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


class StopMatcher:
    """Splits streamed text into what can be emitted now and what must wait for more."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        held = max((n for s in self.stop for n in range(1, len(s))
                    if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def encode_prompt(tokenizer, prompt: str | Sequence[int], add_bos: bool) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=add_bos)
        if not prompt or not ids:
            raise GenerateError("the prompt is empty")
        return ids
    ids = [int(t) for t in prompt]
    if not ids:
        raise GenerateError("the prompt is empty")
    return ids


def stream_generate(backend: Backend, tokenizer, prompt: str | list[int], *,
                    max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                    stop: Sequence[str] = (), decode_mode: str = "clp",
                    prefill_chunk_size: int | None = None,
                    add_bos: bool | None = None) -> Iterator[GenerationResponse]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(stop, str):
        stop = [stop]
    mode = backend.mode_run(decode_mode)
    if add_bos is None:
        add_bos = tokenizer.add_bos_token
    tokenizer.check_fits(backend.config.vocab_size)
    prompt_ids = encode_prompt(tokenizer, prompt, add_bos)
    limit = backend.config.max_position_embeddings
    # the last new token is returned, never fed back: P + N tokens need P + N - 1 positions
    positions = len(prompt_ids) + max_new_tokens - 1
    if positions > limit:
        raise GenerateError(f"{len(prompt_ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                            f"need {positions} positions, more than the model's "
                            f"max_position_embeddings={limit}")
    check_fits(backend.expected_cache_bytes(1, positions, FP32),
               f"a KV cache of {positions} positions")
    sampler = Sampler(sampling or resolve_sampling(backend.generation_config.sampling_defaults()))
    eos_ids = (set(tokenizer.eos_ids) | set(backend.config.eos_token_ids)
               | set(backend.generation_config.eos_token_ids))
    detokenizer = tokenizer.detokenizer()
    stop_matcher = StopMatcher(stop)
    history = list(prompt_ids)

    start = time.perf_counter()
    # Positions for the whole answer are allocated up front (no growth while decoding).
    state, logits = backend.prefill([prompt_ids], positions, prefill_chunk_size)
    prefill_s = time.perf_counter() - start
    token = int(sampler(logits, [history])[0])
    first_token_at = time.perf_counter()
    ttft_s = first_token_at - start
    prompt_tps = len(prompt_ids) / max(prefill_s, 1e-9)

    def response(text, generated, finish_reason):
        decode_s = time.perf_counter() - first_token_at
        return GenerationResponse(
            text=text, token=token, prompt_tokens=len(prompt_ids), prompt_tps=prompt_tps,
            generation_tokens=generated,
            # tokens after the first come from decode steps: their rate is the decode speed
            generation_tps=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            ttft_s=ttft_s, cache_bytes=backend.cache_bytes(state),
            peak_memory_bytes=backend.peak_memory_bytes(), finish_reason=finish_reason,
            backend=backend.name, loops=backend.loops, decode_mode=mode)

    def final_text() -> tuple[str, bool]:
        """The rest of the stream: incomplete UTF-8 bytes, then text held back for stop strings."""
        text, stopped = stop_matcher.add(detokenizer.flush())
        return text + stop_matcher.flush(), stopped

    generated = 0
    while True:
        generated += 1
        history.append(token)
        if token in eos_ids:
            yield response(final_text()[0], generated, "stop")
            return
        text, stopped = stop_matcher.add(detokenizer.add(token))
        if stopped:
            yield response(text, generated, "stop")
            return
        if generated == max_new_tokens:
            rest, stopped = final_text()
            yield response(text + rest, generated, "stop" if stopped else "length")
            return
        yield response(text, generated, None)
        logits = backend.step(state, np.array([token], dtype=np.int64), mode)
        token = int(sampler(logits, [history])[0])


def generate(backend: Backend, tokenizer, prompt: str | list[int],
             **kwargs) -> tuple[str, GenerationResponse]:
    """The whole text and the last response (its stats and finish reason)."""
    pieces, last = [], None
    for last in stream_generate(backend, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
    return "".join(pieces), last
