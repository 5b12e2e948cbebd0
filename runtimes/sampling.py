"""Token sampling on fp32 logits in numpy, shared by every backend.

Order (that of Hugging Face's warpers): repetition penalty, temperature scaling, top-k, top-p,
min-p, then a categorical draw from a seeded numpy Generator. (mlx-lm instead filters the
untempered log-probabilities and applies the temperature at the draw.) Temperature 0 is greedy (argmax of the
penalised logits). Every filter works on a batch of rows [B, V] and masks with -inf.
A sequence with a grammar (`runtimes.grammar.GrammarConstraint`) has the tokens its grammar
does not allow masked to -inf first, before all of them, and its grammar advanced by the
token drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plt_port.errors import PLTError


class SamplingError(PLTError, ValueError):
    """Sampling parameters out of range."""


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

    def __post_init__(self):
        def fail(name, why):
            raise SamplingError(f"sampling parameter {name}: {why}, got {getattr(self, name)!r}")

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

    `constraint`: one sequence's grammar (`mask(logits_row)`, `advance(token)`): then B is 1."""

    def __init__(self, params: SamplingParams | None = None, constraint=None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)
        self.constraint = constraint

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
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty,
                                              p.repetition_context_size)
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
