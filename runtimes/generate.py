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

from .backends.base import Backend
from .sampling import Sampler, SamplingParams, resolve_sampling


class GenerateError(PLTError, ValueError):
    """A generate request that cannot run (empty prompt, bad limits)."""


class ContextLengthError(GenerateError):
    """A prompt and answer longer than the model's context."""


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


class SequenceText:
    """One sequence's token -> text bookkeeping: whole UTF-8 characters, stop strings held back
    and cut, and the finish at eos, at a stop string or after `max_new_tokens` tokens."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop: Sequence[str] = (), eos_ids: Sequence[int] = ()):
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(tokenizer.eos_ids) | set(eos_ids)
        self.detokenizer = tokenizer.detokenizer()
        self.stop_matcher = StopMatcher([stop] if isinstance(stop, str) else stop)
        self.history = list(prompt_ids)  # prompt and generated tokens (the repetition penalty's)
        self.generated = 0
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """The text `token` lets out; sets `finish_reason` when it ends the sequence."""
        self.generated += 1
        self.history.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._final_text()[0]
        text, stopped = self.stop_matcher.add(self.detokenizer.add(token))
        if stopped:
            self.finish_reason = "stop"
        elif self.generated == self.max_new_tokens:
            rest, stopped = self._final_text()
            text += rest
            self.finish_reason = "stop" if stopped else "length"
        return text

    def ends_at(self, token: int) -> bool:
        """Whether `token` ends the sequence whatever its text (eos, or the last one allowed)."""
        return token in self.eos_ids or self.generated + 1 >= self.max_new_tokens

    def _final_text(self) -> tuple[str, bool]:
        """The rest of the stream: incomplete UTF-8 bytes, then text held back for stop strings."""
        text, stopped = self.stop_matcher.add(self.detokenizer.flush())
        return text + self.stop_matcher.flush(), stopped


def check_request(backend: Backend, prompt_ids: Sequence[int], max_new_tokens) -> int:
    """Positions a request needs (the last new token is returned, never fed back: P + N tokens
    need P + N - 1), or a clear error when they do not fit the model or memory."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = backend.config.max_position_embeddings
    positions = len(prompt_ids) + max_new_tokens - 1
    if positions > limit:
        raise ContextLengthError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new "
                                 f"tokens need {positions} positions, more than the model's "
                                 f"context (max_position_embeddings={limit})")
    check_fits(backend.expected_cache_bytes(1, positions, FP32),
               f"a KV cache of {positions} positions")
    return positions


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Prompt ids of a chat (`{"role", "content"}` dicts): the tokenizer's chat template, or
    for a model without one (a base code model) the contents one after another, as one
    plain prompt to continue."""
    if tokenizer.chat_template:
        return tokenizer.encode_chat(list(messages))
    return encode_prompt(tokenizer, "".join(m["content"] for m in messages),
                         tokenizer.add_bos_token)


def stream_generate(backend: Backend, tokenizer, prompt: str | list[int], *,
                    max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                    stop: Sequence[str] = (), decode_mode: str = "clp",
                    prefill_chunk_size: int | None = None, add_bos: bool | None = None,
                    grammar=None) -> Iterator[GenerationResponse]:
    """`grammar`: a `runtimes.grammar.Grammar` the answer must follow (it ends at eos once the
    grammar is complete; at max_new_tokens before that its finish_reason is "length")."""
    mode = backend.mode_run(decode_mode)
    if add_bos is None:
        add_bos = tokenizer.add_bos_token
    tokenizer.check_fits(backend.config.vocab_size)
    prompt_ids = encode_prompt(tokenizer, prompt, add_bos)
    positions = check_request(backend, prompt_ids, max_new_tokens)
    sampler = Sampler(sampling or resolve_sampling(backend.generation_config.sampling_defaults()),
                      grammar.constraint() if grammar is not None else None)
    sequence = SequenceText(tokenizer, prompt_ids, max_new_tokens, stop,
                            backend.eos_token_ids)

    start = time.perf_counter()
    # Positions for the whole answer are allocated up front (no growth while decoding).
    state, logits = backend.prefill([prompt_ids], positions, prefill_chunk_size)
    prefill_s = time.perf_counter() - start
    token = int(sampler(logits, [sequence.history])[0])
    first_token_at = time.perf_counter()
    ttft_s = first_token_at - start
    prompt_tps = len(prompt_ids) / max(prefill_s, 1e-9)

    def response(text):
        generated = sequence.generated
        decode_s = time.perf_counter() - first_token_at
        return GenerationResponse(
            text=text, token=token, prompt_tokens=len(prompt_ids), prompt_tps=prompt_tps,
            generation_tokens=generated,
            # tokens after the first come from decode steps: their rate is the decode speed
            generation_tps=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            ttft_s=ttft_s, cache_bytes=backend.cache_bytes(state),
            peak_memory_bytes=backend.peak_memory_bytes(),
            finish_reason=sequence.finish_reason, backend=backend.name, loops=backend.loops,
            decode_mode=mode)

    while True:
        # the next step runs while this token's text is made and consumed (mlx-lm's overlap);
        # a token that ends the sequence is never fed
        next_logits = None if sequence.ends_at(token) else \
            backend.step_async(state, np.array([token], dtype=np.int64), mode)
        text = sequence.add(token)
        yield response(text)
        if sequence.finish_reason is not None:
            return
        token = int(sampler(next_logits(), [sequence.history])[0])


def generate(backend: Backend, tokenizer, prompt: str | list[int],
             **kwargs) -> tuple[str, GenerationResponse]:
    """The whole text and the last response (its stats and finish reason)."""
    pieces, last = [], None
    for last in stream_generate(backend, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
    return "".join(pieces), last
