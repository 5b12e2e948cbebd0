"""How close low-precision variants decode to the same backend in fp32: MLX exports (bf16,
fp16, 8-bit and 4-bit affine) and ONNX exports (fp16, int8 and int4 MatMulNBits).

`plt-port precision MODEL_DIR [--backend mlx|onnx]` prints the table; `agreement` returns its
numbers.
"""

from __future__ import annotations

import numpy as np

from .backends import BackendError, load_backend
from .sampling import log_softmax

VARIANTS = {
    "mlx": {"bf16": dict(dtype="bfloat16"), "fp16": dict(dtype="float16"),
            "q8": dict(dtype="float32", quantize=8), "q4": dict(dtype="float32", quantize=4)},
    "onnx": {"fp16": dict(dtype="float16"), "int8": dict(dtype="float32", quantize=8),
             "int4": dict(dtype="float32", quantize=4)},
}
GROUP_SIZE_OPTION = {"mlx": "group_size", "onnx": "block_size"}
DEFAULT_GROUP_SIZE = {"mlx": 64, "onnx": 32}


def variant_options(backend: str, name: str, group_size: int | None = None) -> dict:
    """load_backend options of variant `name` of `backend` (quantized: at `group_size`)."""
    if name not in VARIANTS.get(backend, {}):
        raise BackendError(f"no precision variant {name!r} for backend {backend!r}; "
                           f"choose from {', '.join(VARIANTS.get(backend, VARIANTS['mlx']))}")
    options = dict(VARIANTS[backend][name])
    if "quantize" in options:
        options[GROUP_SIZE_OPTION[backend]] = group_size or DEFAULT_GROUP_SIZE[backend]
    return options


def agreement(model_dir: str, prompt: list[int], steps: int = 64, loops: int | None = None,
              variants=("bf16", "q8", "q4"), group_size: int | None = None,
              backend: str = "mlx") -> dict[str, dict]:
    """Decode `steps` greedy tokens with `backend` in fp32, then feed the same tokens to each
    variant (teacher forcing) and compare at every step: share of identical greedy tokens,
    mean KL(p_fp32 || p_variant), and the length of the identical prefix of free greedy runs."""
    options = {name: variant_options(backend, name, group_size) for name in variants}

    def run(runner, forced=None):
        state, logits = runner.prefill([prompt], len(prompt) + steps)
        tokens, all_logits = [], []
        for i in range(steps):
            all_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            next_token = tokens[-1] if forced is None else forced[i]
            logits = runner.step(state, np.array([next_token]))
        return tokens, np.stack(all_logits)

    reference = load_backend(backend, model_dir, loops=loops, dtype="float32")
    ref_tokens, ref_logits = run(reference)
    ref_logp = log_softmax(ref_logits)
    results = {}
    for name in variants:
        variant = load_backend(backend, model_dir, loops=loops, **options[name])
        tokens, logits = run(variant, forced=ref_tokens)
        logp = log_softmax(logits)
        free_tokens, _ = run(variant)
        prefix = next((i for i, (a, b) in enumerate(zip(free_tokens, ref_tokens)) if a != b),
                      steps)
        results[name] = {
            "identical_greedy": float(np.mean(np.array(tokens) == np.array(ref_tokens))),
            "mean_kl": float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean()),
            "free_run_identical_prefix": prefix,
        }
    return results
