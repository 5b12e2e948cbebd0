"""The decode cache of SPEC section 4, as every backend and exporter lays it out.

Per layer, for a batch of B sequences at L loops (G KV heads, head dim D, window W):

  global_kv  K, V [B, G, capacity, D]   loop 1's K/V, position p in slot p
  ring_kv    K, V of loops 2..L         W slots each, position p in slot p % W
  clp_carry  [L-1, B, d]                n(h^(r)) of each sequence's last position (PLT only)

Written without a framework: the helpers take numpy, torch or MLX arrays alike.
"""

from __future__ import annotations

from .config import PLTConfig

GROW_STEP = 256  # global slots are added in multiples of this when a step needs more


def grown_capacity(needed: int, limit: int) -> int:
    """Global-cache capacity for `needed` positions: the next multiple of GROW_STEP, capped at
    max_position_embeddings (one policy for every backend, so cache bytes compare)."""
    return min(limit, -(-needed // GROW_STEP) * GROW_STEP)


def ring_slot_positions(last, slots, window: int):
    """Position held by each ring slot once positions <= last[b] are written: the largest
    p <= last[b] with p % window == slot; negative while the slot is still empty.

    `last` [B] and `slots` (arange(window) of the same array library) -> [B, W]. The modulo
    is Python's (non-negative for a positive window) in numpy, torch and MLX alike.
    """
    return last[:, None] - (last[:, None] - slots[None, :]) % window


def cache_bytes(config: PLTConfig, loops: int, batch: int, capacity: int, itemsize: int) -> int:
    """Bytes of a batch's caches: K and V of `capacity` global slots and (L-1) rings of
    `window` slots per layer, plus the CLP carry of PLT checkpoints."""
    slots = capacity + (loops - 1) * config.window
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * config.head_dim * slots
    carry = 0 if config.is_v1 else (loops - 1) * batch * config.hidden_size
    return (kv + carry) * itemsize
