"""Sizes of a model from its config alone: parameters, weight bytes at each precision, KV-cache
bytes and the peak memory each backend and export needs (`plt-port info`), so a user knows
before downloading whether a model fits.

Peaks are estimates with their basis stated: resident weights and caches as this code lays
them out (activations of a decode step and the runtimes' own overhead are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .cache_layout import DEFAULT_KV_GROUP_SIZE, cache_bytes, kv_quant_option, ring_slots
from .checkpoint import expected_shapes, parameter_count
from .config import PLTConfig
from .errors import PLTError
from .quantization import QuantParams, quantizable

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GROUP_SIZE = 64
BITS = (8, 4)
KV_SETTINGS = (None, 8, 4)  # the global K/V in the run dtype, then 8- and 4-bit
ONNX_VARIANTS = ("float32", "float16", "int8", "int4")  # the weights.bin an export writes


def weight_bytes(config: PLTConfig, precision: str) -> int:
    """Bytes of the weights at `precision`: "float32", "bfloat16", "float16", or "8-bit" /
    "4-bit" (mlx-lm affine, group size 64, bf16 scales and biases; tensors it leaves alone
    in bf16)."""
    if precision in ITEMSIZE:
        return parameter_count(config) * ITEMSIZE[precision]
    params = QuantParams(GROUP_SIZE, int(precision.removesuffix("-bit")))
    return sum(params.nbytes(shape) if quantizable(name, shape, GROUP_SIZE)
               else math.prod(shape) * 2 for name, shape in expected_shapes(config).items())


def kv_cache_bytes(config: PLTConfig, context: int, loops: int, batch: int, dtype: str,
                   kv_bits: int | None = None, kv_group_size: int | None = None) -> int:
    """Global K/V of `context` positions (quantized at `kv_bits`, as the backends' load
    options say), (loops - 1) rings of min(window, context) slots and the CLP carry, in
    `dtype`."""
    return cache_bytes(config, loops, batch, context, ITEMSIZE[dtype],
                       kv_quant_option(kv_bits, kv_group_size, 0, config.head_dim))


def kv_settings(config: PLTConfig, kv_group_size: int | None) -> tuple[int | None, ...]:
    """KV_SETTINGS that apply: the quantized ones need a group size that divides the head dim."""
    try:
        kv_quant_option(8, kv_group_size, 0, config.head_dim)
    except PLTError:
        return (None,)
    return KV_SETTINGS


def kv_name(bits: int | None) -> str:
    return "" if bits is None else f", KV {bits}-bit"


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


def peak_estimates(config: PLTConfig, context: int, loops: int, batch: int,
                   onnx_weights: Mapping[str, int], kv_group_size: int | None = None
                   ) -> list[Estimate]:
    """One row per backend and export; `onnx_weights`: weights.bin bytes of each ONNX
    variant (ONNX_VARIANTS), as the exporter writes them (`exporters.onnx_layout`)."""
    f32, bf16 = (weight_bytes(config, p) for p in ("float32", "bfloat16"))

    def kv(dtype, bits=None):
        return kv_cache_bytes(config, context, loops, batch, dtype, bits, kv_group_size)

    one_tensor = largest_tensor_bytes(config)
    rows = [Estimate("torch backend, float32", f32, kv("float32"),
                     "each tensor read from a memory map and converted once, fp32 caches")]
    settings = kv_settings(config, kv_group_size)
    rows += [Estimate(f"torch backend, bfloat16{kv_name(bits)}", bf16, kv("bfloat16", bits),
                      "bf16 weights kept as stored (a bf16 checkpoint's default), bf16 caches"
                      + ("" if bits is None else f", global K/V {bits}-bit"))
             for bits in settings]
    for precision in ("bfloat16", "4-bit"):
        rows.append(Estimate(f"export mlx, {precision}", weight_bytes(config, precision), 0,
                             "source tensors read one at a time; the converted weights are "
                             "held until written",
                             load_peak=weight_bytes(config, precision) + one_tensor))
    for precision in ("bfloat16", "8-bit", "4-bit"):
        rows += [Estimate(f"mlx backend, {precision}{kv_name(bits)}",
                          weight_bytes(config, precision), kv("bfloat16", bits),
                          "weights as stored, caches in bf16" +
                          ("" if bits is None else f", global K/V {bits}-bit (mlx-lm's layout)"))
                 for bits in settings]
    rows += [
        Estimate("export onnx, any variant", 0, 0,
                 "tensor by tensor into weights.bin: one tensor in memory at a time",
                 load_peak=one_tensor),
        Estimate("onnx backend, float32 (CPU)", onnx_weights["float32"], kv("float32"),
                 "one session pre-packs weights.bin once, fp32 caches"),
        Estimate("onnx backend, float16 (CUDA)", onnx_weights["float16"], kv("float16"),
                 "a 16-bit checkpoint's default on CUDA: fp16 weights and caches"),
    ]
    rows += [Estimate(f"onnx backend, {name} (CPU)", onnx_weights[name], kv("float32"),
                      "MatMulNBits weights (block 32, fp32 scales, fp16 embedding), fp32 "
                      "activations and caches") for name in ("int8", "int4")]
    return rows


def human_bytes(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (B, KiB, MiB, GiB)."""
    units = ("B", "KiB", "MiB", "GiB")
    power = min(len(units) - 1, max(0, int(math.log(max(nbytes, 1), 1024))))
    if power == 0:
        return f"{nbytes:,} B"
    return f"{nbytes / 1024 ** power:,.2f} {units[power]}"


def report(config: PLTConfig, context: int, loops: int, batch: int,
           onnx_weights: Mapping[str, int], kv_group_size: int | None = None) -> str:
    """Markdown: the model's sizes, the KV cache at each setting, then one row per backend
    and export."""
    lines = [f"{config.model_type}: {parameter_count(config):,} parameters, "
             f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads "
             f"(head dim {config.head_dim}), vocabulary {config.vocab_size:,}", "",
             "| weights | bytes |", "|---|---|"]
    for precision in ("float32", "bfloat16", *(f"{bits}-bit" for bits in BITS)):
        name = "bfloat16/float16" if precision == "bfloat16" else precision
        if precision.endswith("-bit"):
            name += f" affine, group {GROUP_SIZE} (mlx)"
        lines.append(f"| {name} | {human_bytes(weight_bytes(config, precision))} |")
    for name in ONNX_VARIANTS:
        what = "MatMulNBits block 32, fp32 scales, fp16 embedding" if name.startswith("int") \
            else "weights.bin"
        lines.append(f"| onnx {name} ({what}) | {human_bytes(onnx_weights[name])} |")
    rings = ring_slots(config.window, context)
    group = kv_group_size or min(DEFAULT_KV_GROUP_SIZE, config.head_dim)
    settings = kv_settings(config, kv_group_size)
    quantized = f"quantized: the global K/V, group {group}, scales in the run dtype; rings " \
        f"and carry stay in it" if len(settings) > 1 else \
        f"no KV quantization: group {group} does not fit the head dim {config.head_dim}"
    lines += ["", f"KV cache at context {context:,}, {loops} loops, batch {batch} "
              f"(global {context:,} + {loops - 1} x {rings:,} ring slots per layer"
              f"{'' if config.is_v1 else ' + carry'}; {quantized}):", "",
              "| global K/V | float32 run | bfloat16 run |", "|---|---|---|"]
    for bits in settings:
        cells = [human_bytes(kv_cache_bytes(config, context, loops, batch, dtype, bits,
                                            kv_group_size)) for dtype in ("float32", "bfloat16")]
        lines.append(f"| {'as the run dtype' if bits is None else f'{bits}-bit'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| backend / export | weights | KV cache | peak (incl. load) | basis |",
              "|---|---|---|---|---|"]
    for row in peak_estimates(config, context, loops, batch, onnx_weights, kv_group_size):
        lines.append(f"| {row.what} | {human_bytes(row.weights)} | {human_bytes(row.cache)} "
                     f"| {human_bytes(row.peak)} | {row.basis} |")
    return "\n".join(lines)
