"""What an ONNX export stores, without onnx: the weights the graph takes (names, sources,
layouts), their quantization (MatMulNBits) and the bytes of weights.bin as the exporter
writes it. `exporters.onnx_graph` materializes these specs; `plt-port info` sizes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from plt_port.checkpoint import expected_shapes
from plt_port.config import PLTConfig

ALIGN = 4096  # every tensor of weights.bin starts at a page boundary
SCALE_DTYPE = np.float32  # MatMulNBits scales (ORT's block quantizer writes fp32)
QUANTIZED_EMBEDDING_DTYPE = np.float16  # the embedding table beside quantized matmuls


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the MatMul weights (MatMulNBits): `bits` 4 or 8, blocks of
    `block_size` input rows, symmetric or with zero points; `accuracy_level` 4 lets ORT's CPU
    kernel compute in int8 (the fast path for 2-16 rows: CLP steps)."""

    bits: int
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4

    def manifest(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "op": "com.microsoft::MatMulNBits"}

    def blocks(self, k: int) -> int:
        """Blocks along the input dim K (the last one zero-padded)."""
        return -(-k // self.block_size)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bits // 8

    def zero_point_bytes(self, k: int, n: int) -> int:
        """Bytes of the zero points (4 bits: two blocks a byte, per output column)."""
        blocks = self.blocks(k)
        return n * (-(-blocks // 2) if self.bits == 4 else blocks)

    def array_nbytes(self, k: int, n: int) -> list[int]:
        """Bytes of the arrays a [K, N] weight is stored as: packed, scales, zero points."""
        blocks = self.blocks(k)
        sizes = [n * blocks * self.block_bytes, n * blocks * np.dtype(SCALE_DTYPE).itemsize]
        return sizes if self.symmetric else sizes + [self.zero_point_bytes(k, n)]


@dataclass(frozen=True)
class WeightSpec:
    """One graph weight from checkpoint tensors `sources`, laid out as `layout`:
    "matmul"     [out, in] tensors -> one [in, sum(out)] weight (quantized when asked);
    "embedding"  as stored, float16 beside quantized matmuls;
    "plain"      as stored (reshaped to `shape` when given);
    "transposed" a [a, b] tensor as [b, a]."""

    name: str
    sources: tuple[str, ...]
    layout: str
    shape: tuple[int, ...] | None = None


def weight_specs(config: PLTConfig, quant: Quantization | None = None) -> list[WeightSpec]:
    """The graph's weights in the order weights.bin holds them: MatMul weights as [in, out]
    with q/k/v and gate/up fused; the LM head [V, d] (Gemm transB, so a tied head is the
    embedding) or, quantized, [d, V]."""
    H, D = config.num_attention_heads, config.head_dim
    specs = [WeightSpec("embed_tokens", ("model.embed_tokens.weight",), "embedding"),
             WeightSpec("norm", ("model.norm.weight",), "plain")]
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    if quant:
        specs.append(WeightSpec("lm_head", (head,), "matmul"))
    elif not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head", (head,), "plain"))
    for i in range(config.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        specs += [
            WeightSpec(f"layers.{i}.qkv_proj", tuple(a + f"{n}_proj.weight" for n in "qkv"),
                       "matmul"),
            WeightSpec(f"layers.{i}.o_proj", (a + "o_proj.weight",), "matmul"),
            WeightSpec(f"layers.{i}.gate_up_proj",
                       (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "matmul"),
            WeightSpec(f"layers.{i}.down_proj", (p + "mlp.down_proj.weight",), "matmul"),
            WeightSpec(f"layers.{i}.input_layernorm", (p + "input_layernorm.weight",), "plain"),
            WeightSpec(f"layers.{i}.post_attention_layernorm",
                       (p + "post_attention_layernorm.weight",), "plain"),
        ]
        gate = f"model.gate_projections.{i}." if config.is_v1 else a + "plt_gate."
        if config.gate_uses_hidden:
            specs += [WeightSpec(f"layers.{i}.gate_proj", (gate + "weight",), "transposed"),
                      WeightSpec(f"layers.{i}.gate_bias", (gate + "bias",), "plain"),
                      WeightSpec(f"layers.{i}.gate_norm", (gate + "gate_norm.weight",), "plain")]
        else:
            specs += [WeightSpec(f"layers.{i}.gate_proj", (gate + "weight",), "plain",
                                 (1, H, 1, D)),
                      WeightSpec(f"layers.{i}.gate_bias", (gate + "bias",), "plain", (1, H, 1))]
    return specs


def stored_dtype(spec: WeightSpec, dtype, quant: Quantization | None):
    """The numpy dtype an unquantized spec is written in."""
    return QUANTIZED_EMBEDDING_DTYPE if spec.layout == "embedding" and quant else np.dtype(dtype)


def matmul_dims(spec: WeightSpec, shapes: dict) -> tuple[int, int]:
    """(K, N) of a fused matmul weight from its [out, in] sources."""
    return shapes[spec.sources[0]][1], sum(shapes[name][0] for name in spec.sources)


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def weights_file_bytes(config: PLTConfig, dtype="float32",
                       quant: Quantization | None = None) -> int:
    """Size of the weights.bin an export of `config` writes (`dtype` the float weights'),
    page alignment included."""
    shapes = expected_shapes(config)
    offset = 0
    for spec in weight_specs(config, quant):
        if spec.layout == "matmul" and quant:
            sizes = quant.array_nbytes(*matmul_dims(spec, shapes))
        else:
            count = sum(math.prod(shapes[name]) for name in spec.sources)
            sizes = [count * np.dtype(stored_dtype(spec, dtype, quant)).itemsize]
        for size in sizes:
            offset = aligned(offset) + size
    return offset
