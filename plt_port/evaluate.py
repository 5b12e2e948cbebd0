"""Held-out loss, perplexity and next-token accuracy on the validation split.

The evaluation set is fixed: the validation files of `plt_port.data` encoded with the
model's own tokenizer (documents joined by eos, as in training), cut into consecutive
windows of `seq_len` predicted tokens. Every window starts a fresh context, so the first
tokens of each window are predicted with little context, exactly as in training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .errors import PLTError
from .memory import check_forward
from .tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 65536
DEFAULT_SEQ_LEN = 256


class EvalError(PLTError, ValueError):
    pass


def validation_tokens(tokenizer: Tokenizer) -> np.ndarray:
    return data.encode_files(tokenizer, data.corpus_files("validation"), tokenizer.eos_ids[0])


def _summary(nll_sum: float, correct: int, count: int) -> dict:
    loss = nll_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count,
            "tokens": count}


@torch.no_grad()
def evaluate_windows(model, windows: np.ndarray, loops: int | None = None,
                     batch_size: int = 8) -> dict:
    """Metrics of `model` (a PLTForCausalLM) over [n, seq_len + 1] token windows."""
    nll_sum, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(windows[i:i + batch_size])).long().to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs, loops=loops).float()
        nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                   reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    return _summary(nll_sum, correct, count)


def evaluate(model_dir: str, loops: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
             batch_size: int = 8, seq_len: int = DEFAULT_SEQ_LEN,
             dtype: str | None = None) -> dict:
    """{loss, perplexity, accuracy, tokens} of the model in `model_dir` on the held-out split.

    `loops`: inference loop count (default: the checkpoint's). `max_tokens`: cap on the
    predicted tokens (None: the whole split). `dtype`: run precision (default: stored, see
    `plt_port.model.run_dtype`).
    """
    from .model import PLTForCausalLM

    if batch_size < 1 or seq_len < 1:
        raise EvalError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    model = PLTForCausalLM.from_pretrained(model_dir, dtype)
    loops = model.config.resolve_loops(loops)
    check_forward(model.config, batch_size, seq_len, loops)
    windows = data.sequential_windows(validation_tokens(Tokenizer.from_dir(model_dir)),
                                      seq_len, max_tokens)
    model.check_token_ids(windows)
    return {**evaluate_windows(model, windows, loops, batch_size), "loops": loops}


def unigram_baseline(tokenizer_dir: str, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                     seq_len: int = DEFAULT_SEQ_LEN) -> dict:
    """The same metrics for a context-free model: add-one smoothed token frequencies of the
    training split, scored on exactly the targets `evaluate` scores."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    train = data.encode_files(tokenizer, data.corpus_files("train"), tokenizer.eos_ids[0])
    counts = np.bincount(train, minlength=tokenizer.vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    windows = data.sequential_windows(validation_tokens(tokenizer), seq_len, max_tokens)
    targets = windows[:, 1:].ravel()
    return _summary(float(-log_probs[targets].sum()), int((targets == counts.argmax()).sum()),
                    targets.size)


def markdown_table(rows: list[dict]) -> str:
    """rows: {"model", "loops", "loss", "perplexity", "accuracy", "tokens"} -> a markdown table."""
    lines = ["| model | inference loops | held-out loss (nats/token) | perplexity | "
             "next-token accuracy | tokens |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row.get('loops', '-')} | {row['loss']:.4f} | "
                     f"{row['perplexity']:.2f} | {100 * row['accuracy']:.2f}% | {row['tokens']} |")
    return "\n".join(lines)
