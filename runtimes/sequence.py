"""One sequence's request checks and its token -> text bookkeeping, shared by the engine and
the generate loop: prompts as token ids, the positions a request needs, whole UTF-8
characters, stop strings held back until they cannot match, and the finish (eos, a stop
string, or the last token allowed).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from plt_port.errors import PLTError
from plt_port.memory import FP32, check_fits

from .backends.base import Backend


class GenerateError(PLTError, ValueError):
    """A generate request that cannot run (empty prompt, bad limits)."""


class ContextLengthError(GenerateError):
    """A prompt and answer longer than the model's context."""


def prefix_function(pattern: str) -> array:
    """Knuth-Morris-Pratt's table: `table[i]` is the length of the longest proper prefix of
    `pattern[:i + 1]` that is also its suffix (built in O(len(pattern)))."""
    table = array("l", bytes(8 * len(pattern)))
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """Splits streamed text into what can be emitted now and what must wait for more.

    One Knuth-Morris-Pratt state per stop string (the length of the longest suffix of the text
    so far that starts it), so each character costs O(number of stop strings) amortized
    whatever their length. The text stops at the first character that ends a stop string (the
    longest one ending there when several do), cut before that stop string: the same answer
    however the text is split into tokens."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.tables = [prefix_function(s) for s in self.stop]
        self.states = [0] * len(self.stop)
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        for i, char in enumerate(text):
            matched = self.advance(char)
            if matched:
                seen = self.pending + text[:i + 1]
                self.pending, self.states = "", [0] * len(self.stop)
                return seen[:len(seen) - matched], True
        seen = self.pending + text
        held = max(self.states, default=0)
        cut = len(seen) - held
        out, self.pending = seen[:cut], seen[cut:]
        return out, False

    def advance(self, char: str) -> int:
        """Feed one character to every stop string's state; the length of the longest stop
        string it completes (0: none)."""
        matched = 0
        for k, (stop, table) in enumerate(zip(self.stop, self.tables)):
            state = self.states[k]
            while state and stop[state] != char:
                state = table[state - 1]
            if stop[state] == char:
                state += 1
            if state == len(stop):
                matched = max(matched, state)
            self.states[k] = state
        return matched

    def flush(self) -> str:
        out, self.pending, self.states = self.pending, "", [0] * len(self.stop)
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


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Prompt ids of a chat (`{"role", "content"}` dicts): the tokenizer's chat template, or
    for a model without one (a base code model) the contents one after another, as one
    plain prompt to continue."""
    if tokenizer.chat_template:
        return tokenizer.encode_chat(list(messages))
    return encode_prompt(tokenizer, "".join(m["content"] for m in messages),
                         tokenizer.add_bos_token)


class SequenceText:
    """One sequence's token -> text bookkeeping: whole UTF-8 characters, stop strings held back
    and cut, and the finish at eos (unless `ignore_eos`), at a stop string or after
    `max_new_tokens` tokens."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop: Sequence[str] = (), eos_ids: Sequence[int] = (),
                 ignore_eos: bool = False):
        self.max_new_tokens = max_new_tokens
        # ignore_eos (vLLM's): an eos token is text like any other and ends nothing
        self.eos_ids = set() if ignore_eos else set(tokenizer.eos_ids) | set(eos_ids)
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
