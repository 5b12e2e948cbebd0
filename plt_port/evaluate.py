"""Held-out loss, perplexity and next-token accuracy on the validation split, and the exact-
match accuracy of the variable-chain task by depth (`chain_accuracy`).

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

from . import data, tasks
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


def evaluate_windows(model, windows: np.ndarray, loops: int | None = None,
                     batch_size: int = 8) -> dict:
    """Metrics of `model` (a PLTForCausalLM) over [n, seq_len + 1] token windows."""
    return evaluate_targets(model, windows[:, :-1], windows[:, 1:], loops, batch_size)


@torch.no_grad()
def evaluate_targets(model, inputs: np.ndarray, targets: np.ndarray, loops: int | None = None,
                     batch_size: int = 8) -> dict:
    """Metrics over the targets of [n, seq_len] inputs; targets of tasks.IGNORE_INDEX are skipped."""
    nll_sum, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(inputs), batch_size):
        batch_inputs, batch_targets = (torch.from_numpy(np.ascontiguousarray(a[i:i + batch_size]))
                                       .long().to(device) for a in (inputs, targets))
        logits = model(batch_inputs, loops=loops).float()
        nll_sum += F.cross_entropy(logits.flatten(0, 1), batch_targets.flatten(),
                                   reduction="sum", ignore_index=tasks.IGNORE_INDEX).item()
        scored = batch_targets != tasks.IGNORE_INDEX
        correct += ((logits.argmax(-1) == batch_targets) & scored).sum().item()
        count += scored.sum().item()
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


# ---- task accuracy: variable chains (plt_port.tasks) ---------------------------------------
@torch.no_grad()
def chain_accuracy(model_dir: str, depths, count: int, loops: int | None = None,
                   seed: int = 0, batch_size: int = 32) -> list[dict]:
    """Exact-match accuracy of the model in `model_dir` on `count` validation programs per
    depth (the same programs for every model and loop count, fixed by `seed`): one row per
    depth with correct, count, accuracy and its binomial standard error.

    A program counts as right when greedy decoding after "# ->" yields the answer and then
    eos. That is scored in one forward over the whole program: greedy decoding reproduces the
    answer exactly when the argmax at every answer position (given the right prefix) is the
    next answer token.
    """
    from .model import PLTForCausalLM

    if count < 1 or batch_size < 1:
        raise EvalError(f"programs per depth and batch_size must be >= 1, got {count}, "
                        f"{batch_size}")
    model = PLTForCausalLM.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    loops = model.config.resolve_loops(loops)
    rows = []
    for depth in tasks.check_depths(depths):
        batch = tasks.programs("validation", f"eval/{seed}/{depth}", count, [depth])
        correct = 0
        for i in range(0, count, batch_size):
            inputs, targets = tasks.program_windows(tokenizer, batch[i:i + batch_size])
            check_forward(model.config, len(inputs), inputs.shape[1], loops)
            model.check_token_ids(inputs)
            predicted = model(torch.from_numpy(inputs), loops=loops).argmax(-1).numpy()
            scored = targets != tasks.IGNORE_INDEX
            correct += int(((predicted == targets) | ~scored).all(axis=1).sum())
        rows.append({"depth": depth, **binomial(correct, count)})
    return rows


def binomial(correct: int, count: int) -> dict:
    accuracy = correct / count
    return {"correct": correct, "count": count, "accuracy": accuracy,
            "stderr": math.sqrt(accuracy * (1 - accuracy) / count)}


def chain_markdown_table(rows: list[dict]) -> str:
    """rows: {"model", "trained_loops", "loops", "depth", "accuracy", "stderr"} -> a table with
    one row per (model, inference loops) and one column per depth: accuracy ± 1 standard error."""
    depths = sorted({r["depth"] for r in rows})
    runs = list(dict.fromkeys((r["model"], r["trained_loops"], r["loops"]) for r in rows))
    cells = {(r["model"], r["loops"], r["depth"]): r for r in rows}
    lines = ["| model | trained loops | inference loops | " +
             " | ".join(f"depth {d}" for d in depths) + " |", "|---" * (3 + len(depths)) + "|"]
    for model, trained, loops in runs:
        values = [cells.get((model, loops, d)) for d in depths]
        lines.append(f"| {model} | {trained} | {loops} | " + " | ".join(
            f"{100 * v['accuracy']:.1f} ± {100 * v['stderr']:.1f}" if v else "-"
            for v in values) + " |")
    return "\n".join(lines)
