"""Gated sliding-window attention for one decode step of the G-SWA loop rows, in MLX.

Memory layout (shared by the composed-ops path and the Metal kernel):
  q          [B, H, R, D]     post-RoPE queries of loop rows 2..L (R = L - 1), all at position t
  global_k/v [B, G, S, D]     loop-1 K/V; slots 0..lengths[b]-1 valid (slot t written this step)
  ring_k/v   [R, B, G, Wr, D] each loop row's own K/V, Wr = min(window, capacity) slots;
                              position p lives in slot p % window (< Wr), so the first
                              min(lengths[b], Wr) slots are valid (slot order is irrelevant
                              to softmax: RoPE is already applied)
  gate       [B, H, R]        g = sigmoid(gate_logit), the share of the global branch
  lengths    [B] int32        tokens in the cache including the current one (t + 1)
Output [B, H, R, D]: g * softmax(q K_glob^T * scale) V_glob + (1 - g) * softmax(q K_ring^T * scale) V_ring.

The global K/V may be quantized (mlx-lm's QuantizedKVCache layout: each a (packed uint32,
scales, biases) triple of `mx.quantize` along D); their branch then runs as mlx-lm's quantized
attention (`mx.quantized_matmul`), in the composed ops only: the Metal kernel reads dense K/V.
"""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx

from plt_port.errors import PLTError

KERNEL_SOURCE = Path(__file__).with_name("gswa_decode.metal").read_text()
INPUT_NAMES = ["q", "global_k", "global_v", "ring_k", "ring_v", "gate", "lengths", "scale"]
SIMD_WIDTH = 32
MAX_SIMDGROUPS = 8
THREADGROUP_MEMORY_BYTES = 32 * 1024  # Apple GPUs: 32 KiB of threadgroup memory


class MetalUnavailableError(PLTError):
    """The Metal kernel was asked for where there is no Metal GPU."""


class GSWAKernelError(PLTError):
    """Inputs the fused G-SWA kernel cannot take (bad shapes, dtypes or sizes)."""


def _masked_attention(q, k, v, valid, scale):
    """q [B, G, n, D] (n = query rows sharing one KV head), k/v [B, G, S, D], valid [B, S]."""
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    scores = mx.where(valid[:, None, None, :], scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v.astype(mx.float32)


def quantized_attention(q, keys, values, scale, mask, kv_quant):
    """mlx-lm's quantized_scaled_dot_product_attention: q [B, H, T, D]; keys, values the
    (packed, scales, biases) triples of [B, G, S, D]; mask None, "causal" (the T queries are
    the last T positions) or bool broadcastable to [B, 1, T, S]. Output [B, H, T, D]."""
    B, H, T, D = q.shape
    G = keys[0].shape[1]
    quant = dict(group_size=kv_quant.group_size, bits=kv_quant.bits)
    # GQA: the H // G query heads of KV head g share its keys (an axis of one to broadcast)
    queries = (q * scale).reshape(B, G, H // G, T, D)
    keys, values = ([part[:, :, None] for part in kv] for kv in (keys, values))
    scores = mx.quantized_matmul(queries, *keys, transpose=True, **quant)
    if isinstance(mask, str):
        S = scores.shape[-1]
        mask = mx.arange(S - T, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return mx.quantized_matmul(probs, *values, transpose=False, **quant).reshape(B, H, T, D)


def gswa_decode_ops(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                    kv_quant=None):
    """Composed-ops reference (fp32 accumulation; a quantized global branch accumulates as
    mlx-lm's quantized attention does); see the module docstring for layouts."""
    B, H, R, D = q.shape
    keys = global_k[0] if kv_quant else global_k  # a quantized triple: its packed values
    G, S, W = keys.shape[1], keys.shape[2], ring_k.shape[3]
    lengths = lengths.astype(mx.int32)
    # GQA: the H // G query heads of KV head g (heads g*n .. g*n+n-1) become extra query rows.
    n = H // G
    global_valid = mx.arange(S)[None, :] < lengths[:, None]
    if kv_quant:
        y_glob = quantized_attention(q, global_k, global_v, scale,
                                     global_valid[:, None, None, :], kv_quant)
    else:
        y_glob = _masked_attention(q.reshape(B, G, n * R, D), global_k, global_v, global_valid,
                                   scale)
    ring_valid = mx.arange(W)[None, :] < mx.minimum(lengths, W)[:, None]
    q_rows = q.reshape(B, G, n, R, D).transpose(3, 0, 1, 2, 4)  # [R, B, G, n, D]
    y_loc = mx.stack([_masked_attention(q_rows[r], ring_k[r], ring_v[r], ring_valid, scale)
                      for r in range(R)])  # [R, B, G, n, D]
    y_loc = y_loc.transpose(1, 2, 3, 0, 4).reshape(B, H, R, D)
    g = gate.astype(mx.float32)[..., None]
    out = g * y_glob.reshape(B, H, R, D).astype(mx.float32) + (1 - g) * y_loc
    return out.astype(q.dtype)


def gswa_decode(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                use_kernel: bool | None = None, kv_quant=None):
    """The one entry point the MLX model calls. `use_kernel`: None = the fused Metal kernel iff
    Metal is available, the default device is the GPU, the global K/V are dense (`kv_quant`
    None) and the shapes fit the kernel; True = the kernel (on the GPU stream) or an error;
    False = the composed ops."""
    if use_kernel is None:
        use_kernel = (mx.metal.is_available() and mx.default_device().type == mx.DeviceType.gpu
                      and kv_quant is None and kernel_supports(q, global_k))
    elif use_kernel and not mx.metal.is_available():
        raise MetalUnavailableError(
            "the fused G-SWA Metal kernel needs an Apple GPU (mx.metal.is_available() is False "
            "here); use the composed ops (kernel off/auto)")
    elif use_kernel and kv_quant is not None:
        raise GSWAKernelError("the fused G-SWA kernel reads dense global K/V; a quantized KV "
                              "cache runs the composed ops (kernel off/auto)")
    if use_kernel:
        return launch_gswa_decode(metal_kernel(), q, global_k, global_v, ring_k, ring_v, gate,
                                  lengths, scale, stream=mx.gpu)
    return gswa_decode_ops(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                           kv_quant)


# ---- the fused kernel -------------------------------------------------------------------

def kernel_spec(source: str | None = None) -> dict:
    """Constructor arguments of `mx.fast.metal_kernel` (or of the CPU emulator) for the kernel."""
    # "safe" math (MLX's default): the online softmax needs exp(-inf) == 0
    return dict(name="gswa_decode", input_names=INPUT_NAMES, output_names=["out"],
                source=KERNEL_SOURCE if source is None else source,
                compile_options={"math_mode": "safe"})


@functools.cache
def metal_kernel():
    """The kernel object, built once per process (MLX caches its compiled variants by name)."""
    return mx.fast.metal_kernel(**kernel_spec())


def simdgroups_for(n_q: int, head_dim: int) -> int:
    """Simdgroups per threadgroup: as many as fit (<= 8), the merge buffers in threadgroup memory."""
    per_lane = -(-head_dim // SIMD_WIDTH)
    per_simdgroup = 4 * (4 * n_q + n_q * per_lane * SIMD_WIDTH)  # tg_max, tg_sum, tg_out
    return min(MAX_SIMDGROUPS, THREADGROUP_MEMORY_BYTES // per_simdgroup)


def kernel_supports(q, global_k) -> bool:
    n_q = q.shape[1] // max(global_k.shape[1], 1)
    return q.shape[3] >= 8 and simdgroups_for(n_q, q.shape[3]) >= 1


def _check_inputs(q, global_k, global_v, ring_k, ring_v, gate, lengths):
    if q.ndim != 4 or global_k.ndim != 4 or ring_k.ndim != 5:
        raise GSWAKernelError(f"G-SWA kernel: q must be [B, H, R, D], global K/V [B, G, S, D], "
                              f"ring K/V [R, B, G, W, D]; got q {q.shape}, global_k "
                              f"{global_k.shape}, ring_k {ring_k.shape}")
    B, H, R, D = q.shape
    G, S, W = global_k.shape[1], global_k.shape[2], ring_k.shape[3]
    expected = {"global_k": (B, G, S, D), "global_v": (B, G, S, D), "ring_k": (R, B, G, W, D),
                "ring_v": (R, B, G, W, D), "gate": (B, H, R), "lengths": (B,)}
    given = {"global_k": global_k, "global_v": global_v, "ring_k": ring_k, "ring_v": ring_v,
             "gate": gate, "lengths": lengths}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise GSWAKernelError(f"G-SWA kernel: {name} has shape {tuple(given[name].shape)}, "
                                  f"expected {shape}")
    if G == 0 or H % G:
        raise GSWAKernelError(f"G-SWA kernel: {H} query heads are not a multiple of {G} KV heads")
    kv_dtypes = {global_k.dtype, global_v.dtype, ring_k.dtype, ring_v.dtype}
    if len(kv_dtypes) != 1:
        raise GSWAKernelError(f"G-SWA kernel: global and ring K/V must share one dtype, got {kv_dtypes}")
    if not kernel_supports(q, global_k):
        raise GSWAKernelError(f"G-SWA kernel: head dim {D} with {H // G} query heads per KV head "
                              f"does not fit the kernel (head dim >= 8, merge buffers <= 32 KiB)")


def kernel_call_args(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                     out_dtype=None) -> dict:
    """Keyword arguments of the kernel call: inputs, template, grid, threadgroup, outputs."""
    _check_inputs(q, global_k, global_v, ring_k, ring_v, gate, lengths)
    B, H, R, D = q.shape
    G = global_k.shape[1]
    n_q = H // G
    nsg = simdgroups_for(n_q, D)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    inputs = [q, global_k, global_v, ring_k, ring_v, gate.astype(mx.float32),
              lengths.astype(mx.int32), mx.array(scale, dtype=mx.float32)]
    return dict(inputs=inputs,
                template=[("T", global_k.dtype), ("O", out_dtype), ("D", D), ("N_Q", n_q),
                          ("NSG", nsg)],
                grid=(SIMD_WIDTH * nsg, G * R, B), threadgroup=(SIMD_WIDTH * nsg, 1, 1),
                output_shapes=[(B, H, R, D)], output_dtypes=[out_dtype])


def launch_gswa_decode(kernel, q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                       out_dtype=None, **call_options):
    """Run the fused kernel through `kernel`: `mx.fast.metal_kernel(**kernel_spec())` on a GPU,
    or `metal_kernels.emulator.EmulatedKernel(**kernel_spec())` on the CPU (same call)."""
    args = kernel_call_args(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale, out_dtype)
    return kernel(**args, **call_options)[0]
