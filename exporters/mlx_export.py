"""`plt-port export mlx MODEL_DIR OUT_DIR`: a PyTorch (HF layout) PLT model -> an MLX model dir.

The output is an HF-layout directory as mlx-lm writes them: `config.json` (the source config
with `torch_dtype` set to the export dtype, an `mlx_export` marker entry and, when quantized,
mlx-lm's `quantization` entry), `model.safetensors` under HF parameter names (quantized
modules hold `weight` (packed uint32), `scales` and `biases`) and the tokenizer files. A PLT
(`iquestpltcoder`) export also carries the self-contained model file of
exporters/mlx_model_file.py, named by config.json's `model_file`, so stock mlx-lm loads it
with `trust_remote_code`; a v1 export has none: mlx-lm's own `iquestloopcoder` loads it.
Quantization is affine `mx.quantize` of the linear layers and the embedding whose input size
the group size divides; norms and the small gate tensors stay in the export dtype. Tensors
are converted one at a time, straight from the checkpoint: no model is built.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from tqdm import tqdm

from plt_port import checkpoint
from plt_port.atomic import atomic_dir
from plt_port.config import PLTConfig
from plt_port.errors import PLTError
from plt_port.files import read_json_object
from plt_port.quantization import QUANTIZABLE_SUFFIXES, quantizable

from .mlx_model_file import MODEL_FILE, model_file_source

DTYPES = ("float32", "float16", "bfloat16")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MARKER = "mlx_export"  # config.json entry that marks an exported MLX directory


class ExportError(PLTError, ValueError):
    """Export options or a source directory that cannot be exported."""


def is_mlx_dir(model_dir: str) -> bool:
    """An MLX model dir loads as it is: a plt-port export, or a quantized checkpoint (an
    mlx-community conversion: `quantization` or its `quantization_config` copy)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return False
    config = read_json_object(path, ExportError)
    return any(key in config for key in (MARKER, "quantization", "quantization_config"))


def check_options(dtype: str, quantize: int | None, group_size: int) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in BITS:
        raise ExportError(f"quantize must be one of {BITS} bits, got {quantize!r}")
    if group_size not in GROUP_SIZES:
        raise ExportError(f"group size must be one of {GROUP_SIZES}, got {group_size!r}")


def mx_array(array: np.ndarray):
    """A numpy array as an mx.array of the same dtype (bf16 arrives as ml_dtypes')."""
    import mlx.core as mx

    if array.dtype == ml_dtypes.bfloat16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def convert(tensors: Mapping[str, np.ndarray], dtype: str, quantize: int | None,
            group_size: int) -> dict:
    """{HF name: numpy array} -> {name: mx.array} in `dtype`, quantized modules as
    `weight`/`scales`/`biases`. Reads `tensors` one at a time (a checkpoint's tensors are
    read on lookup) and evaluates each result, so only the converted weights stay."""
    import mlx.core as mx

    weights, skipped = {}, []
    for name in tqdm(sorted(tensors), desc="export mlx", unit="tensor"):
        value = mx_array(tensors[name]).astype(getattr(mx, dtype))
        module = name.removesuffix(".weight")
        if quantize is not None and quantizable(name, value.shape, group_size):
            packed, scales, biases = mx.quantize(value, group_size=group_size, bits=quantize,
                                                 mode="affine")
            converted = {name: packed, f"{module}.scales": scales, f"{module}.biases": biases}
        else:
            if quantize is not None and name.endswith(QUANTIZABLE_SUFFIXES):
                skipped.append(module)
            converted = {name: value}
        mx.eval(converted)
        weights.update(converted)
    if skipped:
        print(f"plt-port export mlx: kept {len(skipped)} layers in {dtype}: their input size "
              f"is not a multiple of group size {group_size} ({', '.join(skipped[:4])}...)",
              file=sys.stderr)
    return weights


def save_weights(path: str, weights: dict) -> None:
    """mx.save_safetensors, then the file read back: MLX may report a failed write as a
    RuntimeError, or not at all (a full disk can leave a short file and no error)."""
    import mlx.core as mx

    try:
        mx.save_safetensors(path, weights, metadata={"format": "mlx"})
        checkpoint.read_header(path)
    except (RuntimeError, checkpoint.CheckpointError) as exc:
        raise ExportError(f"writing the weights failed; is the disk full? ({exc})") from None


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
           quantize: int | None = None, group_size: int = 64) -> str:
    """Write the MLX export of `model_dir` to `out_dir` atomically; `dtype` None keeps the
    source's `torch_dtype`. Returns `out_dir`."""
    import mlx.core as mx

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if is_mlx_dir(model_dir):
        raise ExportError(f"{model_dir} is already an MLX export; export from the PyTorch model")
    config = PLTConfig.from_file(model_dir)
    dtype = dtype or config.torch_dtype
    check_options(dtype, quantize, group_size)
    weights = convert(checkpoint.open_tensors(model_dir, config), dtype, quantize, group_size)
    data = config.to_dict()
    data["torch_dtype"] = dtype
    # the source's name only: an export carries no local path
    data[MARKER] = {"format": 1, "source": os.path.basename(os.path.abspath(model_dir))}
    if quantize is not None:
        data["quantization"] = {"group_size": group_size, "bits": quantize, "mode": "affine"}
    if not config.is_v1:
        data["model_file"] = MODEL_FILE
    with atomic_dir(out_dir, inputs=(model_dir,)) as tmp:
        if not config.is_v1:
            with open(os.path.join(tmp, MODEL_FILE), "w", encoding="utf-8") as f:
                f.write(model_file_source())
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        save_weights(os.path.join(tmp, checkpoint.SINGLE_FILE), weights)
        checkpoint.copy_tokenizer(model_dir, tmp)
    return out_dir


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
