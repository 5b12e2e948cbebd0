"""Training corpus: the Python standard library sources of the running interpreter.

Real, permissively licensed code that is present on every machine, so nothing is
downloaded. The file list is deterministic: every `.py` file under the stdlib directory
(tests, site-packages and the bundled third-party trees excluded), read as UTF-8,
deduplicated by content, ordered by a hash of the relative path (a fixed shuffle that
does not favour early letters of the alphabet) and cut at a size cap. Files go to the
validation split by a hash of their relative path, so the split does not move when the
cap changes or files are added.

Token batches are random windows of the concatenated training tokens (documents joined
by the eos id); the windows of step s depend only on (seed, step), so a resumed run and
any number of DDP ranks see exactly the data a single uninterrupted process would.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import numpy as np

from .errors import PLTError

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "ensurepip", "_vendor"}
MAX_FILE_BYTES = 200_000
MAX_TOTAL_BYTES = 8_000_000
VALIDATION_PERCENT = 5


class DataError(PLTError, ValueError):
    pass


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _path_hash(relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")


def is_validation(relpath: str, percent: int = VALIDATION_PERCENT) -> bool:
    return _path_hash(relpath) % 100 < percent


def _candidate_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS
                             and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def corpus_files(split: str = "train", root: str | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> list[str]:
    """Absolute paths of the corpus files of `split` ("train", "validation" or "all").

    The size cap applies to the whole corpus before the split, so both splits are fixed
    by (root, caps) alone.
    """
    if split not in ("train", "validation", "all"):
        raise DataError(f"split: expected 'train', 'validation' or 'all', got {split!r}")
    root = root or stdlib_dir()
    if not os.path.isdir(root):
        raise DataError(f"{root}: corpus root is not a directory")
    seen, chosen, total = set(), [], 0
    for rel in sorted(_candidate_files(root), key=_path_hash):
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        if size == 0 or size > max_file_bytes or total + size > max_total_bytes:
            continue
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            continue
        seen.add(digest)
        chosen.append(rel)
        total += size
    if split != "all":
        chosen = [rel for rel in chosen if is_validation(rel) == (split == "validation")]
    if not chosen:
        raise DataError(f"{root}: no {split} corpus files found")
    return [os.path.join(root, rel) for rel in sorted(chosen)]


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def held_out_text(max_chars: int | None = None) -> str:
    """The validation split as one string (files in order, separated by a blank line)."""
    text = "\n\n".join(read_text(p) for p in corpus_files("validation"))
    return text if max_chars is None else text[:max_chars]


def encode_files(tokenizer, paths: list[str], separator_id: int) -> np.ndarray:
    """Token ids of `paths`, each document followed by `separator_id` (int32)."""
    ids = []
    for path in paths:
        ids.extend(tokenizer.encode(read_text(path)))
        ids.append(separator_id)
    return np.asarray(ids, dtype=np.int32)


@dataclass
class TokenBatches:
    """Random [batch, seq_len + 1] windows of a token stream, fixed by (seed, step)."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int  # global batch (all ranks together)
    seed: int

    def __post_init__(self):
        if len(self.tokens) < self.seq_len + 2:
            raise DataError(f"corpus has {len(self.tokens)} tokens, fewer than seq_len + 2 = "
                            f"{self.seq_len + 2}")

    def windows(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        if self.batch_size % world_size:
            raise DataError(f"batch size {self.batch_size} is not divisible by "
                            f"{world_size} processes")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        per_rank = self.batch_size // world_size
        starts = starts[rank * per_rank:(rank + 1) * per_rank]
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])

    def batch(self, step: int, rank: int = 0, world_size: int = 1):
        """(inputs, targets): the windows of `step` and the same shifted by one token."""
        windows = self.windows(step, rank, world_size)
        return windows[:, :-1], windows[:, 1:]


def sequential_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None):
    """Non-overlapping [n, seq_len + 1] windows (consecutive windows share one token) covering
    the first `max_tokens` predicted tokens: the fixed evaluation set."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise DataError(f"{len(tokens)} tokens are too few for one window of {seq_len}")
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
