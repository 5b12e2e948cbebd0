"""The global (loop-1) K/V store of the torch backend: dense in the run dtype, or quantized
as mlx-lm's `QuantizedKVCache` holds it (`plt_port.cache_layout.KVQuant`).

Quantized layout per K (and V) of a layer, for [B, G, S, D] values:
  packed  uint8 [B, G, S, D * bits / 8]   8 bits: one value a byte; 4 bits: two, low nibble first
  scales  [B, G, S, D / group_size]       run dtype
  biases  [B, G, S, D / group_size]       run dtype; value = scale * q + bias
The quantizer is MLX's affine one (`mx.quantize`: the group's max or min, whichever is larger
in magnitude, is represented exactly; computed in fp32, scales and biases then rounded to the
run dtype), so a torch and an MLX cache of the same K/V hold the same values. Attention reads
the slots it needs dequantized to the run dtype (one layer at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plt_port.cache_layout import KVQuant


def quantize(x: torch.Tensor, kv_quant: KVQuant) -> list[torch.Tensor]:
    """x [..., D] -> [packed, scales, biases] (MLX's affine quantization, see above)."""
    bits, group = kv_quant.bits, kv_quant.group_size
    groups = x.float().unflatten(-1, (-1, group))
    n_bins = 2 ** bits - 1
    w_max, w_min = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
    min_is_edge = w_min.abs() > w_max.abs()
    scales = ((w_max - w_min) / n_bins).clamp(min=1e-7)
    scales = torch.where(min_is_edge, scales, -scales)
    edge = torch.where(min_is_edge, w_min, w_max)
    q0 = torch.round(edge / scales)
    scales = torch.where(q0 != 0, edge / q0, scales)
    biases = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.round((groups - biases) / scales).clamp(0, n_bins).to(torch.uint8).flatten(-2)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return [q, scales[..., 0].to(x.dtype), biases[..., 0].to(x.dtype)]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
               kv_quant: KVQuant) -> torch.Tensor:
    """[packed, scales, biases] -> values [..., D] in the scales' dtype."""
    if kv_quant.bits == 4:
        packed = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
    q = packed.to(scales.dtype).unflatten(-1, (scales.shape[-1], -1))
    return (q * scales[..., None] + biases[..., None]).flatten(-2)


@dataclass
class GlobalKV:
    """One layer's global K and V, each a list of parts [B, G, capacity, *] (dense: [values];
    quantized: [packed, scales, biases]), position p in slot p of axis 2."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    kv_quant: KVQuant | None = None

    @classmethod
    def zeros(cls, batch: int, heads: int, capacity: int, head_dim: int, dtype, device,
              kv_quant: KVQuant | None = None) -> "GlobalKV":
        dense = torch.zeros(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        return cls.encoded(dense, dense.clone(), kv_quant)

    @classmethod
    def encoded(cls, keys: torch.Tensor, values: torch.Tensor,
                kv_quant: KVQuant | None) -> "GlobalKV":
        store = cls([], [], kv_quant)
        store.keys, store.values = store.encode(keys), store.encode(values)
        return store

    @property
    def quantized(self) -> bool:
        return self.kv_quant is not None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return quantize(x, self.kv_quant) if self.quantized else [x]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return dequantize(*parts, self.kv_quant) if self.quantized else parts[0]

    def write(self, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v at `index` of the [B, G, S] axes (e.g. (batch, :, slots) or a range)."""
        for parts, x in ((self.keys, k), (self.values, v)):
            for part, encoded in zip(parts, self.encode(x)):
                part[index] = encoded

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots 0..end-1 in the run dtype (views when dense)."""
        return tuple(self.decode([part[:, :, :end] for part in parts])
                     for parts in (self.keys, self.values))

    def grown(self, capacity: int) -> "GlobalKV":
        def grow(part):
            out = part.new_zeros(*part.shape[:2], capacity, *part.shape[3:])
            out[:, :, :part.shape[2]] = part
            return out

        return GlobalKV([grow(p) for p in self.keys], [grow(p) for p in self.values],
                        self.kv_quant)

    def to_quantized(self, kv_quant: KVQuant) -> "GlobalKV":
        return GlobalKV.encoded(self.keys[0], self.values[0], kv_quant)

    def copy_slot(self, slot: int, source: "GlobalKV", source_slot: int, length: int) -> None:
        """Slot `slot`'s first `length` positions <- those of `source` (quantized on the way
        when only this store is quantized; a quantized source needs a quantized store)."""
        if source.kv_quant == self.kv_quant:
            for parts, source_parts in ((self.keys, source.keys), (self.values, source.values)):
                for part, source_part in zip(parts, source_parts):
                    part[slot, :, :length] = source_part[source_slot, :, :length]
            return
        assert not source.quantized, "a quantized sequence goes into a quantized batch"
        self.write((slot, slice(None), slice(0, length)),
                   source.keys[0][source_slot, :, :length],
                   source.values[0][source_slot, :, :length])

    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values
