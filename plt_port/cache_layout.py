"""The decode cache of SPEC section 4, as every backend and exporter lays it out.

Per layer, for a batch of B sequences at L loops (G KV heads, head dim D, window W, global
capacity C):

  global_kv  K, V [B, G, C, D]          loop 1's K/V, position p in slot p
  ring_kv    K, V of loops 2..L         min(W, C) slots each, position p in slot p % W
  clp_carry  [L-1, B, d]                n(h^(r)) of each sequence's last position (PLT only)

A ring never holds more slots than the global capacity: while C < W no position reaches W,
so p % W = p < C and the ring is a plain prefix; when C grows the ring grows with it (new
slots appended at the end, old ones kept where they are) up to W slots, after which it wraps.
The global K/V may be stored quantized (`KVQuant`: mlx-lm's affine groups along D).

Written without a framework: the helpers take numpy, torch or MLX arrays alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PLTConfig
from .errors import PLTError
from .quantization import GROUP_SIZES, QuantParams

GROW_STEP = 256  # global slots are added in multiples of this when a step needs more
KV_BITS = (8, 4)


def grown_capacity(needed: int, limit: int) -> int:
    """Global-cache capacity for `needed` positions: the next multiple of GROW_STEP, capped at
    max_position_embeddings (one policy for every backend, so cache bytes compare)."""
    return min(limit, -(-needed // GROW_STEP) * GROW_STEP)


def ring_slots(window: int, capacity: int) -> int:
    """Slots of each ring for a global capacity: min(window, capacity)."""
    return min(window, capacity)


def ring_slot(position, window: int):
    """The ring slot that holds `position` (an int or an array of them): position % window.
    It is < ring_slots(window, capacity) for every position < capacity."""
    return position % window


def ring_slot_positions(last, slots, window: int):
    """Position held by each ring slot once positions <= last[b] are written: the largest
    p <= last[b] with ring_slot(p) == slot; negative while the slot is still empty.

    `last` [B] and `slots` (arange(ring slots) of the same array library) -> [B, slots]. The
    modulo is Python's (non-negative for a positive window) in numpy, torch and MLX alike.
    """
    return last[:, None] - ring_slot(last[:, None] - slots[None, :], window)


@dataclass(frozen=True)
class KVQuant:
    """Quantized global K/V, as mlx-lm's `--kv-bits`, `--kv-group-size`,
    `--quantized-kv-start` define it: affine `bits` (8 or 4) over groups of `group_size`
    values along the head dim, scales and biases in the run dtype. The global cache of a
    batch stays in the run dtype until a call (a prefill chunk or a step) leaves a sequence
    with at least `start` tokens; from then on it is quantized, every later write too. With
    start 0 it is allocated quantized."""

    bits: int
    group_size: int = 64
    start: int = 0

    def check(self, head_dim: int, error: type[PLTError] = PLTError) -> "KVQuant":
        if self.bits not in KV_BITS or isinstance(self.bits, bool):
            raise error(f"kv_bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES or head_dim % self.group_size:
            raise error(f"kv_group_size must be one of {GROUP_SIZES} and divide the head dim "
                        f"{head_dim}; got {self.group_size!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise error(f"quantized_kv_start must be an integer >= 0, got {self.start!r}")
        return self

    @property
    def params(self) -> QuantParams:
        return QuantParams(self.group_size, self.bits)


DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's


def kv_quant_option(bits, group_size, start, head_dim: int,
                    error: type[PLTError] = PLTError) -> KVQuant | None:
    """The checked KVQuant of the load options kv_bits / kv_group_size (None: mlx-lm's 64,
    or the head dim when that is smaller) / quantized_kv_start (None: the global K/V stay in
    the run dtype)."""
    if bits is None:
        return None
    group_size = group_size or min(DEFAULT_KV_GROUP_SIZE, head_dim)
    return KVQuant(bits, group_size, start).check(head_dim, error)


def global_kv_bytes(config: PLTConfig, batch: int, capacity: int, itemsize: int,
                    kv_quant: KVQuant | None = None) -> int:
    """Bytes of one layer's global K (or V) [B, G, capacity, D]: run dtype, or quantized
    (packed values plus a scale and a bias per group, in the run dtype)."""
    shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
    if kv_quant is None:
        return batch * config.num_key_value_heads * capacity * config.head_dim * itemsize
    return kv_quant.params.nbytes(shape, itemsize)


def cache_bytes(config: PLTConfig, loops: int, batch: int, capacity: int, itemsize: int,
                kv_quant: KVQuant | None = None) -> int:
    """Bytes of a batch's caches: K and V of `capacity` global slots (quantized with
    `kv_quant`) and (L-1) rings of min(window, capacity) slots per layer in the run dtype,
    plus the CLP carry of PLT checkpoints."""
    layers = config.num_hidden_layers
    rings = (loops - 1) * ring_slots(config.window, capacity)
    ring_kv = 2 * layers * batch * config.num_key_value_heads * config.head_dim * rings
    carry = 0 if config.is_v1 else (loops - 1) * batch * config.hidden_size
    return (2 * layers * global_kv_bytes(config, batch, capacity, itemsize, kv_quant)
            + (ring_kv + carry) * itemsize)


def ring_entry_bytes(config: PLTConfig, loops: int, itemsize: int) -> int:
    """Bytes of one position's K and V in every ring (loops 2..L) and layer."""
    return 2 * config.num_hidden_layers * (loops - 1) * config.num_key_value_heads \
        * config.head_dim * itemsize


def carry_bytes(config: PLTConfig, loops: int, itemsize: int) -> int:
    """Bytes of one sequence's CLP carry (0 for v1 checkpoints)."""
    return 0 if config.is_v1 or loops == 1 else (loops - 1) * config.hidden_size * itemsize


def journal_bytes(config: PLTConfig, loops: int, positions: int, itemsize: int) -> int:
    """Bytes of an undo journal of `positions` positions (the ring entries each overwrote and
    the carry before it), for one sequence."""
    return positions * (ring_entry_bytes(config, loops, itemsize)
                        + carry_bytes(config, loops, itemsize))


def snapshot_bytes(config: PLTConfig, loops: int, position: int, itemsize: int) -> int:
    """Bytes of a snapshot of one sequence's rings and carry after `position` tokens."""
    return (min(config.window, position) * ring_entry_bytes(config, loops, itemsize)
            + carry_bytes(config, loops, itemsize))
