"""Gated sliding-window attention for one decode step of the G-SWA loop rows, in MLX.

Memory layout (shared by the composed-ops path and the Metal kernel):
  q          [B, H, R, D]     post-RoPE queries of loop rows 2..L (R = L - 1), all at position t
  global_k/v [B, G, S, D]     loop-1 K/V; slots 0..lengths[b]-1 valid (slot t written this step)
  ring_k/v   [R, B, G, W, D]  each loop row's own K/V; position p lives in slot p % W, so the
                              first min(lengths[b], W) slots are valid (slot order is irrelevant
                              to softmax: RoPE is already applied)
  gate       [B, H, R]        g = sigmoid(gate_logit), the share of the global branch
  lengths    [B] int32        tokens in the cache including the current one (t + 1)
Output [B, H, R, D]: g * softmax(q K_glob^T * scale) V_glob + (1 - g) * softmax(q K_ring^T * scale) V_ring.
"""

from __future__ import annotations

import mlx.core as mx


def _masked_attention(q, k, v, valid, scale):
    """q [B, G, n, D] (n = query rows sharing one KV head), k/v [B, G, S, D], valid [B, S]."""
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    scores = mx.where(valid[:, None, None, :], scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v.astype(mx.float32)


def gswa_decode_ops(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale):
    """Composed-ops reference (fp32 accumulation); see the module docstring for layouts."""
    B, H, R, D = q.shape
    G, S, W = global_k.shape[1], global_k.shape[2], ring_k.shape[3]
    lengths = lengths.astype(mx.int32)
    # GQA: the H // G query heads of KV head g (heads g*n .. g*n+n-1) become extra query rows.
    n = H // G
    q_grouped = q.reshape(B, G, n * R, D)
    global_valid = mx.arange(S)[None, :] < lengths[:, None]
    y_glob = _masked_attention(q_grouped, global_k, global_v, global_valid, scale)
    ring_valid = mx.arange(W)[None, :] < mx.minimum(lengths, W)[:, None]
    q_rows = q.reshape(B, G, n, R, D).transpose(3, 0, 1, 2, 4)  # [R, B, G, n, D]
    y_loc = mx.stack([_masked_attention(q_rows[r], ring_k[r], ring_v[r], ring_valid, scale)
                      for r in range(R)])  # [R, B, G, n, D]
    y_loc = y_loc.transpose(1, 2, 3, 0, 4).reshape(B, H, R, D)
    g = gate.astype(mx.float32)[..., None]
    out = g * y_glob.reshape(B, H, R, D) + (1 - g) * y_loc
    return out.astype(q.dtype)


def gswa_decode(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale):
    """The one entry point the MLX model calls (a Metal kernel may back it on Apple GPUs)."""
    return gswa_decode_ops(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale)
