"""Sizes of a model from its config alone: parameters, weight bytes at each precision, KV-cache
bytes and the peak memory each backend and export needs (`plt-port info`), so a user knows
before downloading whether a model fits.

Peaks are estimates with their basis stated: resident weights and caches as this code lays
them out (activations of a decode step and the runtimes' own overhead are not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cache_layout import cache_bytes
from .checkpoint import expected_shapes, parameter_count
from .config import PLTConfig
from .quantization import QuantParams, quantizable

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GROUP_SIZE = 64
BITS = (8, 4)


def weight_bytes(config: PLTConfig, precision: str) -> int:
    """Bytes of the weights at `precision`: "float32", "bfloat16", "float16", or "8-bit" /
    "4-bit" (mlx-lm affine, group size 64, bf16 scales and biases; tensors it leaves alone
    in bf16)."""
    if precision in ITEMSIZE:
        return parameter_count(config) * ITEMSIZE[precision]
    params = QuantParams(GROUP_SIZE, int(precision.removesuffix("-bit")))
    return sum(params.nbytes(shape) if quantizable(name, shape, GROUP_SIZE)
               else math.prod(shape) * 2 for name, shape in expected_shapes(config).items())


def kv_cache_bytes(config: PLTConfig, context: int, loops: int, batch: int, dtype: str) -> int:
    """Global K/V of `context` positions, (loops - 1) rings of `window` slots, the CLP carry."""
    return cache_bytes(config, loops, batch, context, ITEMSIZE[dtype])


@dataclass
class Estimate:
    what: str
    weights: int     # resident while running (an export: what it writes)
    cache: int
    basis: str
    load_peak: int = 0  # while loading or exporting, when more than weights + cache

    @property
    def peak(self) -> int:
        return max(self.weights + self.cache, self.load_peak)


def largest_tensor_bytes(config: PLTConfig, itemsize: int = 4) -> int:
    return max(math.prod(shape) for shape in expected_shapes(config).values()) * itemsize


def peak_estimates(config: PLTConfig, context: int, loops: int, batch: int) -> list[Estimate]:
    f32, bf16 = (weight_bytes(config, p) for p in ("float32", "bfloat16"))
    kv = {dtype: kv_cache_bytes(config, context, loops, batch, dtype)
          for dtype in ("float32", "bfloat16")}
    one_tensor = largest_tensor_bytes(config)
    rows = [
        Estimate("torch backend, float32", f32, kv["float32"],
                 "each tensor read from a memory map and converted once, fp32 caches"),
        Estimate("torch backend, bfloat16 (a bf16 checkpoint's default)", bf16, kv["bfloat16"],
                 "bf16 weights kept as stored, bf16 caches"),
    ]
    for precision in ("bfloat16", "4-bit"):
        rows.append(Estimate(f"export mlx, {precision}", weight_bytes(config, precision), 0,
                             "source tensors read one at a time; the converted weights are "
                             "held until written",
                             load_peak=weight_bytes(config, precision) + one_tensor))
    for precision in ("bfloat16", "8-bit", "4-bit"):
        rows.append(Estimate(f"mlx backend, {precision}", weight_bytes(config, precision),
                             kv["bfloat16"], "weights as stored, caches in bf16"))
    rows += [
        Estimate("export onnx, float32 or int4", 0, 0,
                 "tensor by tensor into weights.bin: one tensor in memory at a time",
                 load_peak=one_tensor),
        Estimate("onnx backend, float32", f32, kv["float32"],
                 "one session pre-packs weights.bin once, fp32 caches"),
        Estimate("onnx backend, int4", weight_bytes(config, "4-bit"), kv["float32"],
                 "MatMulNBits int4 weights, fp32 activations and caches"),
    ]
    return rows


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB"


def report(config: PLTConfig, context: int, loops: int, batch: int) -> str:
    """Markdown: the model's sizes, then one row per backend and export."""
    lines = [f"{config.model_type}: {parameter_count(config):,} parameters, "
             f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads "
             f"(head dim {config.head_dim}), vocabulary {config.vocab_size:,}", "",
             "| weights | bytes |", "|---|---|"]
    for precision in ("float32", "bfloat16", *(f"{bits}-bit" for bits in BITS)):
        name = "bfloat16/float16" if precision == "bfloat16" else precision
        if precision.endswith("-bit"):
            name += f" affine, group {GROUP_SIZE}"
        lines.append(f"| {name} | {gib(weight_bytes(config, precision))} |")
    lines += ["", f"KV cache at context {context:,}, {loops} loops, batch {batch} "
              f"(global {context:,} + {loops - 1} x {config.window} ring slots per layer"
              f"{'' if config.is_v1 else ' + carry'}): "
              f"{gib(kv_cache_bytes(config, context, loops, batch, 'float32'))} in fp32, "
              f"{gib(kv_cache_bytes(config, context, loops, batch, 'bfloat16'))} in bf16", "",
              "| backend / export | weights | KV cache | peak (incl. load) | basis |",
              "|---|---|---|---|---|"]
    for row in peak_estimates(config, context, loops, batch):
        lines.append(f"| {row.what} | {gib(row.weights)} | {gib(row.cache)} | {gib(row.peak)} "
                     f"| {row.basis} |")
    return "\n".join(lines)
