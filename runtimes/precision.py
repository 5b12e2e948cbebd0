"""How close low-precision variants decode to the same backend at full precision: MLX exports
(bf16, fp16, 8-bit and 4-bit affine), ONNX exports (fp16, int8 and int4 MatMulNBits), and the
quantized KV cache of torch and MLX (kv8, kv4: the global K/V at 8 and 4 bits against the
unquantized cache, same weights and dtype).

`plt-port precision MODEL_DIR [--backend mlx|onnx|torch] [--context N]` prints the table;
`agreement` returns its numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np

from plt_port.config import PLTConfig

from .backends import BackendError, load_backend
from .sampling import log_softmax

KV_VARIANTS = {"kv8": dict(kv_bits=8), "kv4": dict(kv_bits=4)}
VARIANTS = {
    "mlx": {"bf16": dict(dtype="bfloat16"), "fp16": dict(dtype="float16"),
            "q8": dict(dtype="float32", quantize=8), "q4": dict(dtype="float32", quantize=4),
            **KV_VARIANTS},
    "onnx": {"fp16": dict(dtype="float16"), "int8": dict(dtype="float32", quantize=8),
             "int4": dict(dtype="float32", quantize=4)},
    "torch": dict(KV_VARIANTS),
}
GROUP_SIZE_OPTION = {"mlx": "group_size", "onnx": "block_size"}
DEFAULT_GROUP_SIZE = {"mlx": 64, "onnx": 32}


def variant_options(backend: str, name: str, group_size: int | None = None,
                    kv_group_size: int | None = None) -> dict:
    """load_backend options of variant `name` of `backend` (quantized weights: at
    `group_size`; quantized KV: at `kv_group_size`, None for the backend's default)."""
    if name not in VARIANTS.get(backend, {}):
        raise BackendError(f"no precision variant {name!r} for backend {backend!r}; "
                           f"choose from {', '.join(VARIANTS.get(backend, VARIANTS['mlx']))}")
    options = dict(VARIANTS[backend][name])
    if "quantize" in options:
        options[GROUP_SIZE_OPTION[backend]] = group_size or DEFAULT_GROUP_SIZE[backend]
    if "kv_bits" in options:
        options["kv_group_size"] = kv_group_size
    return options


def agreement(model_dir: str, prompt: list[int], steps: int = 64, loops: int | None = None,
              variants=("bf16", "q8", "q4"), group_size: int | None = None,
              backend: str = "mlx", kv_group_size: int | None = None,
              dtype: str = "float32", chunk_size: int | None = None,
              **load_options) -> dict[str, dict]:
    """Decode `steps` greedy tokens with `backend` in `dtype` (the reference), then feed the
    same tokens to each variant (teacher forcing; a variant without a dtype of its own runs
    in `dtype`) and compare at every step: share of identical greedy tokens, mean
    KL(p_reference || p_variant), and the length of the identical prefix of free greedy runs.
    The prompt is prefilled in chunks of `chunk_size`; `load_options` (e.g. device) go to
    every load."""
    options = {name: {"dtype": dtype, **load_options,
                      **variant_options(backend, name, group_size, kv_group_size)}
               for name in variants}

    def run(runner, forced=None):
        state, logits = runner.prefill([prompt], len(prompt) + steps, chunk_size)
        tokens, all_logits = [], []
        for i in range(steps):
            all_logits.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            next_token = tokens[-1] if forced is None else forced[i]
            logits = runner.step(state, np.array([next_token]))
        return tokens, np.stack(all_logits)

    reference = load_backend(backend, model_dir, loops=loops, dtype=dtype, **load_options)
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


@contextmanager
def with_positions(model_dir: str, positions: int):
    """`model_dir`, or when its max_position_embeddings is below `positions` a temporary copy
    (its files hard-linked, or copied across file systems; config.json rewritten) that
    allows them: RoPE itself has no limit."""
    config = PLTConfig.from_file(model_dir)
    if positions <= config.max_position_embeddings:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="plt-context-") as copy:
        for name in os.listdir(model_dir):
            source = os.path.join(model_dir, name)
            if name != "config.json" and os.path.isfile(source):
                try:
                    os.link(source, os.path.join(copy, name))
                except OSError:
                    shutil.copy2(source, os.path.join(copy, name))
        with open(os.path.join(copy, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.replace(max_position_embeddings=positions).to_dict(), f)
        yield copy
