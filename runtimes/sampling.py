"""Token sampling on fp32 logits in numpy, shared by every backend.

Order (that of Hugging Face's warpers, with OpenAI's penalties beside the repetition penalty):
repetition penalty, presence and frequency penalties, logit bias, temperature scaling, top-k,
top-p, min-p, then a categorical draw from a seeded numpy Generator. (mlx-lm instead filters
the untempered log-probabilities and applies the temperature at the draw.) Temperature 0 is
greedy (argmax of the penalised, biased logits). Every filter works on a batch of rows [B, V]
and masks with -inf.

Presence and frequency penalties follow OpenAI: over the tokens generated so far (not the
prompt), `logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`.

A sequence with a grammar (`runtimes.grammar.GrammarConstraint`) has the tokens its grammar
does not allow masked to -inf first, before all of them, and its grammar advanced by the
token drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from plt_port.errors import PLTError


MAX_PENALTY = 2.0        # OpenAI's range for presence_penalty and frequency_penalty
MAX_LOGIT_BIAS = 100.0   # OpenAI's range for logit_bias values


class SamplingError(PLTError, ValueError):
    """Sampling parameters out of range; `param` names the one (None: not one field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NonFiniteLogitsError(PLTError, ArithmeticError):
    """The model produced NaN or infinite logits: its weights or config are broken."""


@dataclass
class SamplingParams:
    temperature: float = 0.0        # 0 -> greedy (argmax)
    top_k: int = 0                  # 0 -> off
    top_p: float = 1.0              # 1 -> off
    min_p: float = 0.0              # 0 -> off
    repetition_penalty: float = 1.0
    seed: int | None = None
    repetition_context_size: int = 20  # recent tokens the penalty looks at (mlx-lm's default)
    presence_penalty: float = 0.0   # OpenAI's, -2..2, 0 -> off
    frequency_penalty: float = 0.0  # OpenAI's, -2..2, 0 -> off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias, -100..100

    def __post_init__(self):
        def fail(name, why):
            raise SamplingError(f"sampling parameter {name}: {why}, got {getattr(self, name)!r}",
                                name)

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        if not 0 <= self.temperature < math.inf:
            fail("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1] (0 = off)")
        if not 0 < self.repetition_penalty < math.inf:
            fail("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            fail("seed", "must be a non-negative integer or None")
        if not is_int(self.repetition_context_size) or self.repetition_context_size < 1:
            fail("repetition_context_size", "must be an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                fail(name, f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}] (0 = off)")
        if not isinstance(self.logit_bias, dict) or not all(
                is_int(token) and token >= 0 and isinstance(bias, (int, float, np.number))
                and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS
                for token, bias in self.logit_bias.items()):
            fail("logit_bias", f"must map token ids >= 0 to biases in "
                               f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[Sequence[int]],
                             penalty: float, context_size: int) -> np.ndarray:
    """Logits of tokens among each row's last `context_size` tokens: divided by `penalty`
    when positive, multiplied when negative (both lower them for penalty > 1)."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, tokens in zip(logits, history):
        seen = np.unique(np.asarray(list(tokens)[-context_size:], dtype=np.int64))
        if seen.size:
            picked = row[seen]
            row[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_openai_penalties(logits: np.ndarray, history: Sequence[Sequence[int]],
                           prompt_lengths: Sequence[int], presence: float,
                           frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties over each row's generated tokens (those of
    `history[b]` after its first `prompt_lengths[b]`)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    logits = logits.copy()
    for row, tokens, start in zip(logits, history, prompt_lengths):
        tokens = list(tokens)[start:]
        if tokens:
            counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=row.shape[-1])
            row -= (counts * frequency + (counts > 0) * presence)[:row.shape[-1]]
    return logits


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """Add `bias[token]` to each row's logit of `token`."""
    if not bias:
        return logits
    tokens = np.fromiter(bias, dtype=np.int64, count=len(bias))
    if tokens.max() >= logits.shape[-1]:
        raise SamplingError(f"logit_bias names token {int(tokens.max())}, past the "
                            f"vocabulary of {logits.shape[-1]}")
    logits = logits.copy()
    logits[:, tokens] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = -np.partition(-logits, k - 1, axis=-1)[:, k - 1:k]
    return np.where(logits >= kth_largest, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (exact differences, e.g. for KL)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most probable tokens whose mass reaches `top_p` (the one crossing it included)."""
    if top_p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = np.empty_like(mass_before, dtype=bool)
    np.put_along_axis(keep, order, mass_before < top_p, axis=-1)
    return np.where(keep, logits, -np.inf)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens with probability >= min_p * (probability of the most likely token)."""
    if min_p <= 0.0:
        return logits
    log_probs = logits - logits.max(axis=-1, keepdims=True)  # log(p / p_max)
    return np.where(log_probs >= np.log(min_p), logits, -np.inf)


def resolve_sampling(defaults: dict, **chosen) -> SamplingParams:
    """The user's values (None: not chosen) over a model's `defaults` (its
    generation_config.json, `GenerationConfig.sampling_defaults()`) over SamplingParams'."""
    return SamplingParams(**{**defaults, **{k: v for k, v in chosen.items() if v is not None}})


class Sampler:
    """`sampler(logits [B, V], history) -> tokens [B]`; `history[b]` = row b's tokens so far.

    The history of the first call is the prompt: the tokens after it are the generated ones
    that presence and frequency penalties count.

    `constraint`: one sequence's grammar (`mask(logits_row)`, `advance(token)`): then B is 1."""

    def __init__(self, params: SamplingParams | None = None, constraint=None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)
        self.constraint = constraint
        self.prompt_lengths: list[int] | None = None

    def __call__(self, logits: np.ndarray, history: Sequence[Sequence[int]] = ()) -> np.ndarray:
        tokens = self._sample(logits, history)
        if self.constraint is not None:
            self.constraint.advance(int(tokens[0]))
        return tokens

    def _sample(self, logits: np.ndarray, history: Sequence[Sequence[int]]) -> np.ndarray:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim == 1:
            logits = logits[None]
        if not np.isfinite(logits).all():
            raise NonFiniteLogitsError("the model produced NaN or infinite logits (broken "
                                       "weights, or a config value such as rms_norm_eps)")
        if self.constraint is not None:
            logits = self._masked(logits)
        if history:
            if self.prompt_lengths is None:
                self.prompt_lengths = [len(tokens) for tokens in history]
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty,
                                              p.repetition_context_size)
            logits = apply_openai_penalties(logits, history, self.prompt_lengths,
                                            p.presence_penalty, p.frequency_penalty)
        logits = apply_logit_bias(logits, p.logit_bias)
        if p.greedy:
            return logits.argmax(axis=-1)
        # shifted by the row maximum before dividing: a tiny temperature sends the other
        # logits to -inf and the maximum stays 0, never inf - inf (NaN)
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):
            logits = (logits - logits.max(axis=-1, keepdims=True)) / p.temperature
        logits = apply_min_p(apply_top_p(apply_top_k(logits, p.top_k), p.top_p), p.min_p)
        return self.categorical(softmax(logits))

    def _masked(self, logits: np.ndarray) -> np.ndarray:
        if logits.shape[0] != 1:
            raise SamplingError(f"a sampler with a grammar samples one sequence, got "
                                f"{logits.shape[0]} rows")
        return self.constraint.mask(logits[0])[None]

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        """One draw per row by inverting the cumulative distribution with a uniform number."""
        cumulative = np.cumsum(probs, axis=-1)
        u = self.rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
        return np.minimum((cumulative <= u).sum(axis=-1), probs.shape[-1] - 1)
