"""How close low-precision MLX exports (bf16, fp16, 8-bit, 4-bit) decode to the fp32 export.

`plt-port precision MODEL_DIR` prints the table; `agreement` returns its numbers.
"""

from __future__ import annotations

import numpy as np

from .mlx_backend import MLXBackend

GROUP_SIZE = 64
VARIANTS = {"bf16": dict(dtype="bfloat16"), "fp16": dict(dtype="float16"),
            "q8": dict(dtype="float32", quantize=8), "q4": dict(dtype="float32", quantize=4)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def agreement(model_dir: str, prompt: list[int], steps: int = 64, loops: int | None = None,
              variants=("bf16", "q8", "q4"), group_size: int = GROUP_SIZE) -> dict[str, dict]:
    """Decode `steps` greedy tokens with the fp32 export, then feed the same tokens to each
    variant (teacher forcing) and compare at every step: share of identical greedy tokens,
    mean KL(p_fp32 || p_variant), and the length of the identical prefix of free greedy runs."""
    def run(backend, forced=None):
        state, logits = backend.prefill([prompt], len(prompt) + steps)
        tokens, all_logits = [], []
        for i in range(steps):
            all_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            next_token = tokens[-1] if forced is None else forced[i]
            logits = backend.step(state, np.array([next_token]))
        return tokens, np.stack(all_logits)

    reference = MLXBackend(model_dir, loops=loops, dtype="float32")
    ref_tokens, ref_logits = run(reference)
    ref_logp = _log_softmax(ref_logits.astype(np.float64))
    results = {}
    for name in variants:
        backend = MLXBackend(model_dir, loops=loops, group_size=group_size, **VARIANTS[name])
        tokens, logits = run(backend, forced=ref_tokens)
        logp = _log_softmax(logits.astype(np.float64))
        free_tokens, _ = run(backend)
        prefix = next((i for i, (a, b) in enumerate(zip(free_tokens, ref_tokens)) if a != b),
                      steps)
        results[name] = {
            "identical_greedy": float(np.mean(np.array(tokens) == np.array(ref_tokens))),
            "mean_kl": float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean()),
            "free_run_identical_prefix": prefix,
        }
    return results
