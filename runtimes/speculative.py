"""Speculative decoding: drafts proposed cheaply, verified by the target model in one prefill
chunk, the rejected tail dropped with `Backend.rewind`.

Verifying k drafts after the last sampled token t is `Backend.verify(state, [t, d1..dk])`: a
chunk of k+1 rows, L passes through the stack (loop r over the k+1 positions after loop r-1),
where a CLP decode step is one pass of L rows. Row j's logits are those a decode step of the
chunk's token j would give, so the target's token after each prefix is picked from them by
the sequence's own Sampler (grammar mask, penalties over the history up to that row, logit
bias, temperature, top-k/p, min-p: its whole processing, in its order). Draft j is accepted
while it equals the target's token; the first that differs is replaced by the target's (the
correction), and when all k are accepted the last row gives one more (the bonus). The state
is then rewound to the tokens kept (the journal's undo: the rejected positions' ring entries
and carry).

Why this is the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): both
proposers draft deterministically (the n-gram's continuation, the draft model's argmax), so
the draft distribution q is a point mass on the draft d. The rule accepts d with probability
min(1, p(d)/q(d)) = p(d), else draws from norm(max(0, p - q)) = p without d, renormalised:
the law of one draw t ~ p, kept as the accepted draft when t == d and as the correction
otherwise. Every kept token is thus one draw from the target's distribution given its prefix,
one uniform number per token as in plain decoding: greedy output is identical to plain
decoding's, and so is seeded sampling's (up to the rounding that separates a prefill row's
logits from a decode step's).

Two proposers: `NgramProposer` (prompt lookup: vLLM's `ngram`, transformers'
`prompt_lookup_num_tokens`) and `DraftModelProposer` (a second backend with the same
tokenizer, greedy, its own state kept in step with the target's by rewinds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from plt_port import cache_layout
from plt_port.errors import PLTError

from .backends.base import Backend
from .backends.history import HistoryPolicy
from .prompt_cache import shared_prefix

METHODS = ("off", "ngram", "draft")
DEFAULT_NUM_TOKENS = 5
DEFAULT_NGRAM_SIZE = 3
MAX_NUM_TOKENS = 64
MAX_BACKOFF = 16  # plain decode steps at most between verifies that do not pay


class SpeculativeError(PLTError, ValueError):
    """Speculative decoding options that cannot run."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """`method` "ngram" or "draft" (then `draft_model`, a model directory, and the loops it
    drafts at, default its own); `num_tokens` drafts per verify (vLLM's
    num_speculative_tokens); `ngram_size` the longest n-gram looked up (prompt_lookup_max,
    down to prompt_lookup_min = 1)."""

    method: str = "ngram"
    num_tokens: int = DEFAULT_NUM_TOKENS
    ngram_size: int = DEFAULT_NGRAM_SIZE
    draft_model: str | None = None
    draft_loops: int | None = None

    def __post_init__(self):
        if self.method not in METHODS[1:]:
            raise SpeculativeError(f"speculative method must be one of {METHODS[1:]}, "
                                   f"got {self.method!r}")
        for name, top in (("num_tokens", MAX_NUM_TOKENS), ("ngram_size", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 \
                    or (top is not None and value > top):
                raise SpeculativeError(f"speculative {name} must be an integer in 1.."
                                       f"{top or 'n'}, got {value!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise SpeculativeError("--speculative draft needs --draft-model DIR (and a "
                                   "draft model needs --speculative draft)")


def speculative_config(method: str, num_tokens: int | None, ngram_size: int | None,
                       draft_model: str | None,
                       draft_loops: int | None = None) -> SpeculativeConfig | None:
    """The config of the CLI's options (None: --speculative off); an option given for a
    method that does not use it is refused by name."""
    for option, value, methods in (("--num-speculative-tokens", num_tokens, "ngram or draft"),
                                   ("--ngram-size", ngram_size, "ngram"),
                                   ("--draft-model", draft_model, "draft"),
                                   ("--draft-loops", draft_loops, "draft")):
        if value is not None and method not in methods.split(" or "):
            raise SpeculativeError(f"{option} needs --speculative {methods}")
    if method == "off":
        return None
    return SpeculativeConfig(method, num_tokens or DEFAULT_NUM_TOKENS,
                             ngram_size or DEFAULT_NGRAM_SIZE, draft_model, draft_loops)


@dataclass
class SpeculativeStats:
    drafted: int = 0     # draft tokens verified
    accepted: int = 0    # of them, kept
    verifies: int = 0    # verify passes (a prefill chunk of the last token and the drafts)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens each verify produced: its accepted drafts and the correction or bonus."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    def add(self, other: "SpeculativeStats") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.verifies += other.verifies

    def as_dict(self) -> dict:
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "verify_passes": self.verifies,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_verify": round(self.tokens_per_verify, 4)}

    def line(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} drafts accepted "
                f"({self.acceptance_rate:.0%}), {self.tokens_per_verify:.2f} tokens/verify "
                f"over {self.verifies} verifies")


class NgramProposer:
    """Prompt lookup: for n = max_n down to min_n, the last n tokens of the context matched
    against every earlier position; at the most recent match, the k tokens that followed it,
    copied as LZ77 copies: past the context's end, on from the drafts themselves (a match
    one period back drafts the repetition on, not one token)."""

    def __init__(self, max_n: int = DEFAULT_NGRAM_SIZE, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        tokens = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # windows starting at 0..len-1-n: each has at least one token after it
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                copied = tokens[int(hits[-1]) + n:].tolist()  # at least one token
                return (copied * -(-k // len(copied)))[:k]
        return []


class DraftModelProposer:
    """Greedy drafts from a second backend (same tokenizer). Its state holds `fed` (the
    context, then the drafts but the last); each proposal rewinds it to the part of `fed`
    the new context shares and feeds the rest, so it never prefills the context again."""

    def __init__(self, backend: Backend, num_tokens: int):
        self.backend = backend
        self.policy = HistoryPolicy(depth=num_tokens + 1)
        self.state = None
        self.fed: list[int] = []
        self.logits: np.ndarray | None = None  # [1, V] after fed[-1]

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k < 1:
            return []
        logits = self._sync(list(context))
        drafts = []
        for i in range(k):
            drafts.append(int(logits[0].argmax()))
            if i + 1 < k:
                logits = self.backend.step(self.state, np.array(drafts[-1:]))
                self.fed.append(drafts[-1])
        self.logits = logits
        return drafts

    def _sync(self, context: list[int]) -> np.ndarray:
        """The draft state holding `context`; logits after its last token."""
        common = shared_prefix(self.fed, context)
        if self.state is not None and common == len(context) == len(self.fed):
            return self.logits
        keep = min(common, len(context) - 1)
        if self.state is None:
            capacity = cache_layout.grown_capacity(len(context) + MAX_NUM_TOKENS,
                                                   self.backend.config.max_position_embeddings)
            self.state, logits = self.backend.prefill([context], capacity, history=self.policy)
        else:
            self.backend.rewind(self.state, 0, keep)
            logits = self.backend.extend(self.state, context[keep:])
        self.fed = context
        return logits


class Backoff:
    """When drafting pays: a verify costs about L decode steps (L passes), so one that yields
    fewer than max(2, L) tokens (its accepted drafts and the correction) loses time; after
    each such verify in a row the sequence decodes plainly for 1, 2, 4 .. MAX_BACKOFF steps,
    and a verify that pays starts it over. The output is the same either way."""

    def __init__(self):
        self.failures = 0
        self.waiting = 0

    def ready(self) -> bool:
        """Whether to draft at this step (else one plain step is counted off)."""
        if self.waiting:
            self.waiting -= 1
            return False
        return True

    def note(self, accepted: int, loops: int) -> None:
        if accepted + 1 >= max(2, loops):
            self.failures = 0
        else:
            self.waiting = min(2 ** self.failures, MAX_BACKOFF)
            self.failures += 1


class Speculation:
    """What an engine speculates with: its config, and the draft backend (loaded on first
    use, in the thread that runs the engine; one for every request)."""

    def __init__(self, config: SpeculativeConfig,
                 load_draft: Callable[[str, int | None], Backend] | None = None):
        self.config = config
        self.load_draft = load_draft
        self.draft_backend: Backend | None = None
        self.stats = SpeculativeStats()  # every request's, for /metrics

    def check_target(self, backend: Backend) -> None:
        """A clear error when `backend` cannot verify drafts, or the draft model does not
        share its vocabulary."""
        if not backend.supports_verify:
            raise SpeculativeError(f"the {backend.name} backend cannot verify drafts "
                                   f"(speculative decoding needs every row's logits)")
        if self.config.method == "draft":
            draft = self._draft()
            if draft.config.vocab_size != backend.config.vocab_size:
                raise SpeculativeError(
                    f"--draft-model {self.config.draft_model} has a vocabulary of "
                    f"{draft.config.vocab_size} tokens, the model {backend.config.vocab_size}: "
                    f"a draft model needs the same tokenizer")

    def _draft(self) -> Backend:
        if self.draft_backend is None:
            if self.load_draft is None:
                raise SpeculativeError("--speculative draft needs a way to load the draft model")
            self.draft_backend = self.load_draft(self.config.draft_model, self.config.draft_loops)
        return self.draft_backend

    def proposer(self):
        if self.config.method == "ngram":
            return NgramProposer(self.config.ngram_size)
        return DraftModelProposer(self._draft(), self.config.num_tokens)


def verify_drafts(backend: Backend, state, last_token: int, drafts: list[int],
                  target_token: Callable[[np.ndarray], int],
                  keep: Callable[[int], bool]) -> int:
    """Verify `drafts` after `last_token` (sampled, not yet in `state`, a state of one
    sequence) and rewind the state to the tokens kept; return how many drafts were accepted.

    `target_token(logits [V])` picks the target's token after a row (the sequence's sampler,
    which moves on with it: the token is the sequence's next one); `keep(token)`, called for
    each accepted draft, takes it (e.g. delivers its text) and says whether the sequence goes
    on after it (False: it ended there, the rest is not looked at). The target's token after
    the last kept one (the correction or the bonus) is left as the sequence's next token."""
    start = int(state.lengths[0])
    logits = backend.verify(state, [last_token, *drafts])
    accepted = 0
    for row, draft in zip(logits, drafts):
        if target_token(row) != draft:
            break
        accepted += 1
        if not keep(draft):
            break
    else:
        target_token(logits[len(drafts)])  # every draft accepted: the bonus token
    backend.rewind(state, 0, start + 1 + accepted)
    return accepted
