"""`plt-port export mlx MODEL_DIR OUT_DIR`: a PyTorch (HF layout) PLT model -> an MLX model dir.

The output is an HF-layout directory as mlx-lm writes them: `config.json` (the source config
with `torch_dtype` set to the export dtype, an `mlx_export` marker entry and, when quantized,
mlx-lm's `quantization` entry), `model.safetensors` under HF parameter names (quantized
modules hold `weight` (packed uint32), `scales` and `biases`) and the tokenizer files.
Quantization is affine `mx.quantize` of the linear layers and the embedding whose input size
the group size divides; norms and the small gate tensors stay in the export dtype.

`agreement(...)` measures how close a low-precision export decodes to fp32.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from plt_port import checkpoint
from plt_port.config import PLTConfig
from plt_port.errors import PLTError

DTYPES = ("float32", "float16", "bfloat16")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MARKER = "mlx_export"  # config.json entry that marks an exported MLX directory


class ExportError(PLTError, ValueError):
    """Export options or a source directory that cannot be exported."""


def is_mlx_dir(model_dir: str) -> bool:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return MARKER in json.load(f)


def check_options(dtype: str, quantize: int | None, group_size: int) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in BITS:
        raise ExportError(f"quantize must be one of {BITS} bits, got {quantize!r}")
    if group_size not in GROUP_SIZES:
        raise ExportError(f"group size must be one of {GROUP_SIZES}, got {group_size!r}")


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
           quantize: int | None = None, group_size: int = 64) -> str:
    """Write the MLX export of `model_dir` to `out_dir` atomically; `dtype` None keeps the
    source's `torch_dtype`. Returns `out_dir`."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from runtimes.mlx_model import Model, ModelArgs

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if is_mlx_dir(model_dir):
        raise ExportError(f"{model_dir} is already an MLX export; export from the PyTorch model")
    config = PLTConfig.from_file(model_dir)
    dtype = dtype or config.torch_dtype
    check_options(dtype, quantize, group_size)
    tensors = checkpoint.load_tensors(model_dir, config)
    model = Model(ModelArgs.from_dict(config.to_dict()))
    model.load_weights([(name, mx.array(value)) for name, value in tensors.items()], strict=True)
    model.set_dtype(getattr(mx, dtype))
    data = config.to_dict()
    data["torch_dtype"] = dtype
    data[MARKER] = {"format": 1, "source": os.path.abspath(model_dir)}
    if quantize is not None:
        skipped = []

        def quantizable(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            if module.weight.shape[-1] % group_size:
                skipped.append(path)
                return False
            return True

        nn.quantize(model, group_size=group_size, bits=quantize, mode="affine",
                    class_predicate=quantizable)
        if skipped:
            print(f"plt-port export mlx: kept {len(skipped)} layers in {dtype}: their input size "
                  f"is not a multiple of group size {group_size} ({', '.join(skipped[:4])}...)",
                  file=sys.stderr)
        data["quantization"] = {"group_size": group_size, "bits": quantize, "mode": "affine"}
    weights = dict(tree_flatten(model.parameters()))
    with checkpoint.atomic_dir(out_dir, inputs=(model_dir,)) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        mx.save_safetensors(os.path.join(tmp, checkpoint.SINGLE_FILE), weights,
                            metadata={"format": "mlx"})
        checkpoint.copy_tokenizer(model_dir, tmp)
    return out_dir


# ---- agreement of low-precision exports with fp32 ----------------------------------------------
VARIANTS = {"bf16": dict(dtype="bfloat16"), "fp16": dict(dtype="float16"),
            "q8": dict(dtype="float32", quantize=8), "q4": dict(dtype="float32", quantize=4)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def agreement(model_dir: str, prompt: list[int], steps: int = 64, loops: int | None = None,
              variants=("bf16", "q8", "q4"), group_size: int = 64) -> dict[str, dict]:
    """Decode `steps` greedy tokens with the fp32 export, then feed the same tokens to each
    variant (teacher forcing) and compare at every step: share of identical greedy tokens,
    mean KL(p_fp32 || p_variant), and the length of the identical prefix of free greedy runs."""
    from runtimes.mlx_backend import MLXBackend

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


# ---- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weight dtype (default: the source's torch_dtype)")
    parser.add_argument("--quantize", type=int, choices=BITS, default=None,
                        help="affine-quantize linear layers and the embedding to this many bits")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="quantization group size (default 64)")


def run(args):
    out_dir = export(args.model_dir, args.out_dir, dtype=args.dtype, quantize=args.quantize,
                     group_size=args.group_size)
    print(f"wrote {out_dir}")


def main(argv=None):
    """python -m exporters.mlx_export MODEL_DIR: agreement of bf16/fp16/8-bit/4-bit with fp32."""
    import argparse

    from plt_port.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m exporters.mlx_export", description=main.__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="def binary_search(items, target):\n    ")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--loops", type=int, default=None)
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    prompt = Tokenizer.from_dir(args.model_dir).encode(args.prompt, add_bos=True)
    results = agreement(args.model_dir, prompt, args.steps, args.loops, args.variants,
                        args.group_size)
    print(f"| variant | identical greedy tokens (teacher-forced, {args.steps} steps) | "
          f"mean KL(fp32 || variant) | identical prefix of free greedy run |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['identical_greedy']:.3f} | {row['mean_kl']:.2e} | "
              f"{row['free_run_identical_prefix']} |")


if __name__ == "__main__":
    main()
