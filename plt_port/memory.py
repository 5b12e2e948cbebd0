"""Sizes of a request checked against the model and the machine before anything is allocated.

An oversized request (a 1e9-token answer, a 100k-token eval window, 100000 CPU threads) fails
here with what it needs and what there is, instead of deep inside numpy, torch or a thread pool.
"""

from __future__ import annotations

import os

from .config import PLTConfig
from .errors import PLTError

FP32 = 4


class MemoryLimitError(PLTError, ValueError):
    """A request that needs more memory or cores than this machine has, or more positions than
    the model."""


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory size."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(nbytes: int, request: str) -> None:
    """Raise when `request` (what is being asked, in the user's terms) needs more than the
    available memory."""
    available = available_memory_bytes()
    if nbytes > available:
        raise MemoryLimitError(f"{request} needs about {nbytes / 2**30:.3g} GiB, more than the "
                               f"{available / 2**30:.3g} GiB of memory available")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_thread_count(threads: int, option: str,
                       error: type[PLTError] = MemoryLimitError) -> None:
    """A CPU thread count (`option` names it) must be between 1 and the usable cores: torch
    segfaults and ONNX Runtime hangs creating 100000 threads."""
    cores = usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise error(f"{option} must be an integer from 1 to {cores} (the CPU cores "
                               f"this process may use), got {threads!r}")


def forward_bytes(config: PLTConfig, batch: int, seq_len: int, loops: int,
                  keep_attention: bool = False) -> int:
    """Peak activation bytes (fp32) of one full forward of `batch` windows of `seq_len` tokens:
    one layer's attention scores and probabilities [B, H, T, T] (both branches), the logits
    and their log-softmax [B, T, V]; with `keep_attention` (diagnose) the global and local
    maps of every layer and loop are kept."""
    B, T, H = batch, seq_len, config.num_attention_heads
    maps = 2 * B * H * T * T * (loops * config.num_hidden_layers if keep_attention else 2)
    logits = 2 * B * T * config.vocab_size
    hidden = 4 * B * T * max(config.hidden_size, config.intermediate_size)
    return FP32 * (maps + logits + hidden)


def check_forward(config: PLTConfig, batch: int, seq_len: int, loops: int,
                  keep_attention: bool = False) -> None:
    """Windows of `seq_len` tokens must fit the model's positions and the machine's memory."""
    if seq_len > config.max_position_embeddings:
        raise MemoryLimitError(f"seq_len {seq_len} is more than the model's "
                               f"max_position_embeddings={config.max_position_embeddings}")
    check_fits(forward_bytes(config, batch, seq_len, loops, keep_attention),
               f"a forward of {batch} windows of {seq_len} tokens at {loops} loops")
