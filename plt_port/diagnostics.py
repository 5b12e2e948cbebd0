"""Loop diagnostics (SPEC section 8): what each loop of a PLT model does to its hidden states.

For loops r = 1..L (h^(0) = the embeddings), per layer l where it applies, on held-out text:

- step_size:       mean_t ||h^(r)_t - h^(r-1)_t|| / ||h^(r-1)_t||
- kl_shift:        mean_t KL(p_r || p_{r-1}), p_r = softmax(LMHead(FinalNorm(h^(r)))) (logit lens)
- effective_rank:  exp(entropy of the normalised singular values of the [tokens, d] matrix h^(r))
- alignment:       mean_t cosine(h^(r) - h^(r-1), h^(r-1) - h^(r-2))                   (r >= 2)
- attn_entropy_*:  mean entropy of attention rows, global branch (loop 1: its causal
                   attention) and local (window) branch                        (local: r >= 2)
- attn_change_*:   mean total-variation distance between the rows of loop r's and loop r-1's
                   attention maps                                      (global r >= 2, local r >= 3)
- gate_mean:       mean g, the global branch's share                                    (r >= 2)
- offset_cost:     mean_{t>=1} ||n(h^(r-1))_t - n(h^(r-1))_{t-1}||, the CLP shift mismatch
                   (r >= 2, PLT only)
- loss, accuracy:  next-token cross-entropy / accuracy of the logit lens at loop r, which is
                   exactly the model run with `loops=r` (loop r never reads a later loop).

"Per layer" uses each layer's output inside loop r (forward hooks on the shared stack); the
per-loop value of the hidden-state metrics is the last layer's (that is h^(r)), of the
attention metrics the mean over layers. One forward at L loops gives every loop r <= L.

Memory stays bounded: text is cut into windows processed in batches, and each batch adds
to running sums (a [d, d] Gram matrix per (loop, layer) for the effective rank); attention
maps of one batch are dropped before the next.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .atomic import atomic_dir
from .memory import check_forward
from .data import sequential_windows
from .errors import PLTError
from .evaluate import validation_tokens
from .model import PLTForCausalLM
from .tokenizer import Tokenizer


class DiagnosticsError(PLTError, ValueError):
    """Bad input to the loop diagnostics (loop range, text, window sizes)."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str          # "hidden" (per layer; loop value = last layer), "attention" (per layer;
                       # loop value = mean over layers) or "loop" (per loop only)
    first_loop: int    # first loop it is defined for


METRICS = [
    Metric("step_size", "step size ||h(r) - h(r-1)|| / ||h(r-1)||", "hidden", 1),
    Metric("kl_shift", "output shift KL(p_r || p_r-1) [nats]", "hidden", 1),
    Metric("effective_rank", "effective rank of h(r)", "hidden", 1),
    Metric("alignment", "update alignment cos(dh(r), dh(r-1))", "hidden", 2),
    Metric("attn_entropy_global", "attention entropy, global branch [nats]", "attention", 1),
    Metric("attn_entropy_local", "attention entropy, local branch [nats]", "attention", 2),
    Metric("attn_change_global", "attention change vs loop r-1, global (TV)", "attention", 2),
    Metric("attn_change_local", "attention change vs loop r-1, local (TV)", "attention", 3),
    Metric("gate_mean", "gate mean g (global share)", "attention", 2),
    Metric("offset_cost", "offset cost mean ||n(h(r-1))_t - n(h(r-1))_t-1||", "loop", 2),
    Metric("loss", "next-token loss at loop r [nats]", "loop", 1),
    Metric("accuracy", "next-token accuracy at loop r", "loop", 1),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}


# ---- metrics: tensors in, numbers out ---------------------------------------------------

def step_size(h: torch.Tensor, h_prev: torch.Tensor) -> float:
    """mean over tokens of ||h_t - h_prev_t|| / ||h_prev_t||; h, h_prev [..., d]."""
    h, h_prev = h.float(), h_prev.float()
    return ((h - h_prev).norm(dim=-1) / h_prev.norm(dim=-1)).mean().item()


def kl_divergence(logits: torch.Tensor, logits_prev: torch.Tensor) -> float:
    """mean over tokens of KL(softmax(logits) || softmax(logits_prev)); [..., V] each."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(logits_prev.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean().item()


def gram(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> X^T X [d, d] in float64 (X = x as a [tokens, d] matrix)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def effective_rank_from_gram(gram_matrix: torch.Tensor, rows: int,
                             eps: float = torch.finfo(torch.float32).eps) -> float:
    """exp(entropy of s / sum(s)), s = singular values of a [rows, d] matrix with Gram X^T X.

    Singular values under numpy's matrix_rank tolerance (s_max * max(rows, d) * eps, eps of
    the matrix's dtype) count as zero, so a rank-k matrix has effective rank <= k.
    """
    eig = torch.linalg.eigvalsh(gram_matrix.double()).clamp_min(0)
    s = eig.sqrt()
    if s.max() == 0:
        return 0.0
    s = torch.where(s > s.max() * max(rows, gram_matrix.shape[-1]) * eps, s, 0.0)
    p = s / s.sum()
    return math.exp(-torch.special.xlogy(p, p).sum().item())


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank of x as a [tokens, d] matrix (Roy and Vetterli, 2007)."""
    return effective_rank_from_gram(gram(x), x.numel() // x.shape[-1], torch.finfo(x.dtype).eps)


def update_alignment(h: torch.Tensor, h_prev: torch.Tensor, h_prev2: torch.Tensor) -> float:
    """mean over tokens of cosine(h - h_prev, h_prev - h_prev2): +1 same direction, -1 reversed.

    Tokens where either update is exactly zero have no direction and are left out (with the
    CLP shift, position 0 of loops r >= 3 repeats loop r-1 exactly); 0.0 if no token is left.
    """
    update = h.float() - h_prev.float()
    previous_update = h_prev.float() - h_prev2.float()
    defined = (update.norm(dim=-1) > 0) & (previous_update.norm(dim=-1) > 0)
    if not defined.any():
        return 0.0
    return F.cosine_similarity(update[defined], previous_update[defined], dim=-1).mean().item()


def attention_entropy(probs: torch.Tensor) -> float:
    """mean entropy (nats) of attention rows; probs [..., Tq, Tk], rows sum to 1."""
    return -torch.special.xlogy(probs, probs).sum(-1).mean().item()


def attention_change(probs: torch.Tensor, probs_prev: torch.Tensor) -> float:
    """mean total-variation distance 0.5 * sum_k |p - q| between matching rows (0..1)."""
    return 0.5 * (probs.float() - probs_prev.float()).abs().sum(-1).mean().item()


def gate_mean(gate: torch.Tensor) -> float:
    return gate.float().mean().item()


def offset_cost(carry: torch.Tensor) -> float:
    """mean over t >= 1 of ||c_t - c_{t-1}||, c = n(h^(r-1)) [..., T, d]: how far the shifted
    input of loop r (built from t-1) is from the unshifted one."""
    return (carry[..., 1:, :].float() - carry[..., :-1, :].float()).norm(dim=-1).mean().item()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[list[float], float]:
    """(mean cross-entropy of each sequence, accuracy) of logits [B, T, V] predicting ids[:, 1:]."""
    logits, targets = logits[:, :-1].float(), ids[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.mean(1).tolist(), (logits.argmax(-1) == targets).float().mean().item()


# ---- accumulation over batches ----------------------------------------------------------

class _RunningMeans:
    """Weighted running means keyed by (metric, loop, layer) and Gram sums by (loop, layer)."""

    def __init__(self):
        self.sums: dict[tuple, list[float]] = {}
        self.grams: dict[tuple, torch.Tensor] = {}
        self.gram_rows: dict[tuple, int] = {}
        self.window_losses: dict[int, list[float]] = {}  # loop -> loss of each window

    def add(self, metric: str, loop: int, layer: int | None, value: float, weight: int):
        entry = self.sums.setdefault((metric, loop, layer), [0.0, 0])
        entry[0] += value * weight
        entry[1] += weight

    def add_gram(self, loop: int, layer: int, x: torch.Tensor):
        key = (loop, layer)
        self.grams[key] = self.grams.get(key, 0) + gram(x)
        self.gram_rows[key] = self.gram_rows.get(key, 0) + x.numel() // x.shape[-1]

    def mean(self, metric: str, loop: int, layer: int | None) -> float | None:
        if metric == "effective_rank":
            key = (loop, layer)
            return effective_rank_from_gram(self.grams[key], self.gram_rows[key]) \
                if key in self.grams else None
        entry = self.sums.get((metric, loop, layer))
        return entry[0] / entry[1] if entry else None


@torch.no_grad()
def _add_batch(model, ids: torch.Tensor, loops: int, stats: _RunningMeans) -> None:
    layers = model.model.layers
    layer_outputs: list[torch.Tensor] = []  # loop-major: loop 1 layers 0..N-1, loop 2, ...
    hooks = [layer.register_forward_hook(lambda module, args, out: layer_outputs.append(out))
             for layer in layers]
    try:
        _, trace = model(ids, loops=loops, return_trace=True)
    finally:
        for hook in hooks:
            hook.remove()
    n_layers, tokens = len(layers), ids.numel()
    predicted = ids[:, 1:].numel()

    for layer in range(n_layers):
        h = [trace.embeddings] + layer_outputs[layer::n_layers]  # h[r] = h^(r) after this layer
        logits_prev = model.lm_logits(h[0])
        for r in range(1, loops + 1):
            logits = model.lm_logits(h[r])
            stats.add("step_size", r, layer, step_size(h[r], h[r - 1]), tokens)
            stats.add("kl_shift", r, layer, kl_divergence(logits, logits_prev), tokens)
            stats.add_gram(r, layer, h[r])
            if r >= 2:
                stats.add("alignment", r, layer, update_alignment(h[r], h[r - 1], h[r - 2]), tokens)
            if layer == n_layers - 1:
                window_losses, accuracy = next_token_loss(logits, ids)
                stats.window_losses.setdefault(r, []).extend(window_losses)
                stats.add("loss", r, None, sum(window_losses) / len(window_losses), predicted)
                stats.add("accuracy", r, None, accuracy, predicted)
            logits_prev = logits

    for r in range(1, loops + 1):
        for layer in range(n_layers):
            attn_global = trace.attn_global[r - 1][layer]
            rows = attn_global.shape[:-1].numel()
            stats.add("attn_entropy_global", r, layer, attention_entropy(attn_global), rows)
            if r >= 2:
                attn_local = trace.attn_local[r - 1][layer]
                stats.add("attn_entropy_local", r, layer, attention_entropy(attn_local), rows)
                stats.add("attn_change_global", r, layer,
                          attention_change(attn_global, trace.attn_global[r - 2][layer]), rows)
                stats.add("gate_mean", r, layer, gate_mean(trace.gates[r - 1][layer]), rows)
            if r >= 3:
                stats.add("attn_change_local", r, layer,
                          attention_change(attn_local, trace.attn_local[r - 2][layer]), rows)
        if r >= 2 and not model.config.is_v1:
            carry = model.loop_carry(trace.hidden[r - 2])
            stats.add("offset_cost", r, None, offset_cost(carry), predicted)


def _summarise(stats: _RunningMeans, loops: int, n_layers: int) -> tuple[dict, dict]:
    per_layer, per_loop = {}, {}
    for metric in METRICS:
        loop_range = range(1, loops + 1)
        if metric.kind == "loop":
            per_loop[metric.key] = [stats.mean(metric.key, r, None) for r in loop_range]
            continue
        table = [[stats.mean(metric.key, r, layer) for layer in range(n_layers)]
                 for r in loop_range]
        per_layer[metric.key] = table
        if metric.kind == "hidden":
            per_loop[metric.key] = [row[-1] for row in table]
        else:
            per_loop[metric.key] = [None if None in row else sum(row) / len(row) for row in table]
    return per_loop, per_layer


# ---- running it on a model ---------------------------------------------------------------

def parse_loops(spec: str | int | None) -> int | None:
    """`--loops`: "N" or "1..N" -> N (metrics always cover loops 1..N); None -> checkpoint's."""
    if spec is None or isinstance(spec, int):
        return spec
    text = str(spec).strip()
    first, sep, last = text.partition("..")
    try:
        first_loop, last_loop = (int(first), int(last)) if sep else (1, int(text))
    except ValueError:
        raise DiagnosticsError(f"--loops: expected N or 1..N, got {spec!r}") from None
    if first_loop != 1:
        raise DiagnosticsError(f"--loops: per-loop metrics start at loop 1 (loop r needs loops "
                               f"< r), got {spec!r}; use 1..{last_loop}")
    return last_loop


def token_windows(tokens, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Consecutive [n, seq_len + 1] windows of a token stream covering about `max_tokens`
    predicted tokens (the windows `plt-port eval` scores, when given its stream)."""
    if seq_len < 1:
        raise DiagnosticsError(f"seq_len must be >= 1, got {seq_len}")
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise DiagnosticsError(f"the text has {len(tokens)} tokens; diagnostics need at least 2")
    seq_len = min(seq_len, len(tokens) - 1)
    return torch.from_numpy(sequential_windows(tokens, seq_len, max_tokens))


def text_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """`token_windows` of the start of `text`."""
    return token_windows(_encode_prefix(tokenizer, text, max_tokens), seq_len, max_tokens)


def _encode_prefix(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """Tokens of the start of `text`, at least max_tokens + 1 of them when the text has them
    (encodes a growing prefix instead of a whole corpus)."""
    chars = len(text) if max_tokens is None else 8 * (max_tokens + 1)
    while True:
        tokens = tokenizer.encode(text[:chars])
        if max_tokens is None or len(tokens) > max_tokens or chars >= len(text):
            return tokens
        chars *= 2


def diagnose(model_dir: str | os.PathLike, loops: int | str | None = None,
             text: str | None = None, seq_len: int = 256, batch_size: int = 4,
             max_tokens: int | None = 16384, progress: bool = True, model=None) -> dict:
    """Loop diagnostics of the model in `model_dir` on `text` (default: the held-out split as
    `plt-port eval` reads it, so loop r's loss is eval's loss at `loops=r` on the same windows).

    Returns a JSON-able dict: `per_loop[metric]` is a list over loops 1..L, `per_layer[metric]`
    a [L][n_layers] table; None where a metric does not apply to that loop.
    """
    if batch_size < 1:
        raise DiagnosticsError(f"batch_size must be >= 1, got {batch_size}")
    model = model or PLTForCausalLM.from_pretrained(model_dir)
    loops = model.config.resolve_loops(parse_loops(loops))
    check_forward(model.config, batch_size, seq_len, loops, keep_attention=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    if text is None:
        windows = token_windows(validation_tokens(tokenizer), seq_len, max_tokens)
    else:
        windows = text_windows(tokenizer, text, seq_len, max_tokens)
    model.check_token_ids(windows)

    stats = _RunningMeans()
    batches = windows.split(batch_size)
    for ids in tqdm(batches, desc=f"diagnose {os.path.basename(os.fspath(model_dir))} "
                                  f"loops={loops}", unit="batch", disable=not progress):
        _add_batch(model, ids, loops, stats)
    n_layers = model.config.num_hidden_layers
    per_loop, per_layer = _summarise(stats, loops, n_layers)
    return {
        "model": os.fspath(model_dir),
        "model_type": model.config.model_type,
        "trained_loops": model.config.num_loops,
        "loops": loops,
        "layers": n_layers,
        "emb_scale": model.config.emb_scale,        # a and b of u(r) = a E + b n(h(r-1)) shifted
        "hidden_scale": model.config.hidden_scale,
        "windows": len(windows),
        "seq_len": windows.shape[1],
        "tokens": windows.numel(),
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        # loss of each window at each loop: paired comparisons between runs on the same windows
        "loss_per_window": [stats.window_losses[r] for r in range(1, loops + 1)],
        "metrics": {m.key: {"label": m.label, "kind": m.kind, "first_loop": m.first_loop}
                    for m in METRICS},
        "per_loop": per_loop,
        "per_layer": per_layer,
    }


# ---- presentation ------------------------------------------------------------------------

def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(result: dict) -> str:
    """Metrics as rows, loops as columns (markdown pipe table, readable on a terminal)."""
    loops = result["loops"]
    header = ["metric"] + [f"loop {r}" for r in range(1, loops + 1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, values in result["per_loop"].items():
        lines.append("| " + " | ".join([key] + [_fmt(v) for v in values]) + " |")
    return "\n".join(lines)


def metric_figure(result: dict, key: str):
    """One metric vs loop: the per-loop value (bold) and each layer's (thin)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    loop_axis = list(range(1, result["loops"] + 1))
    for layer, values in enumerate(zip(*result["per_layer"].get(key, []))):
        ax.plot(*_defined(loop_axis, values), marker=".", linewidth=0.8, alpha=0.6,
                label=f"layer {layer}")
    metric = METRIC_BY_KEY[key]
    label = {"hidden": "loop output (= last layer)", "attention": "mean over layers", "loop": key}[metric.kind]
    ax.plot(*_defined(loop_axis, result["per_loop"][key]), marker="o", linewidth=2.2,
            color="black", label=label)
    log_scale_if_wide(ax, [v for row in result["per_layer"].get(key, []) for v in row]
                      + result["per_loop"][key])
    ax.set_xticks(loop_axis)
    ax.set_xlabel("loop r")
    ax.set_title(metric.label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def log_scale_if_wide(ax, values) -> None:
    """Log y axis when positive values span more than two decades (e.g. the loop-1 step from
    the small embeddings next to the later loops' steps)."""
    values = [v for v in values if v is not None]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")


def _defined(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def figures(result: dict) -> list[tuple[str, object]]:
    """(metric key, matplotlib Figure) for every metric defined for at least one loop."""
    return [(key, metric_figure(result, key)) for key, values in result["per_loop"].items()
            if any(v is not None for v in values)]


def write_outputs(result: dict, out_dir: str | os.PathLike) -> str:
    """diagnostics.json, table.md and one <metric>.png per metric, written atomically."""
    with atomic_dir(out_dir) as tmp:
        with open(os.path.join(tmp, "diagnostics.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        with open(os.path.join(tmp, "table.md"), "w", encoding="utf-8") as f:
            f.write(format_table(result) + "\n")
        for key, fig in figures(result):
            fig.savefig(os.path.join(tmp, f"{key}.png"), dpi=110)
    return os.fspath(out_dir)


def loop_analysis_figures(model_dir: str | os.PathLike, loops: int | None = None,
                          text: str | None = None, max_tokens: int = 512,
                          seq_len: int = 128) -> list[tuple[str, object]]:
    """Quick diagnostics for the demo: (title, Figure) per metric from `max_tokens` tokens of
    `text` (default: the held-out split) at `loops` (default: the checkpoint's)."""
    result = diagnose(model_dir, loops, text, seq_len=seq_len, batch_size=4,
                      max_tokens=max_tokens, progress=False)
    return [(METRIC_BY_KEY[key].label, fig) for key, fig in figures(result)]
