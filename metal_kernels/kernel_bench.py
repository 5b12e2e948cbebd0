"""Time one G-SWA decode call: the fused Metal kernel vs the composed ops (run on a Mac).

    python -m metal_kernels.kernel_bench                      # LoopCoder-v2 7B layer shapes, fp16
    python -m metal_kernels.kernel_bench --lengths 256,4096 --rows 3 --dtype float32

Prints microseconds per call and the K/V bytes read per call divided by that time. Where Metal
is missing only the ops path is timed. Whole-model numbers: `plt-port bench --kernel on|off`.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from metal_kernels.gswa import gswa_decode


def make_inputs(batch, heads, kv_heads, rows, head_dim, length, window, dtype):
    mx.random.seed(0)
    normal = lambda *shape: mx.random.normal(shape).astype(dtype)  # noqa: E731
    return dict(q=normal(batch, heads, rows, head_dim),
                global_k=normal(batch, kv_heads, length, head_dim),
                global_v=normal(batch, kv_heads, length, head_dim),
                ring_k=normal(rows, batch, kv_heads, window, head_dim),
                ring_v=normal(rows, batch, kv_heads, window, head_dim),
                gate=mx.sigmoid(normal(batch, heads, rows)),
                lengths=mx.full((batch,), length, mx.int32), scale=head_dim ** -0.5)


def time_call(inputs, use_kernel, iters):
    for _ in range(3):
        mx.eval(gswa_decode(**inputs, use_kernel=use_kernel))
    start = time.perf_counter()
    for _ in range(iters):
        mx.eval(gswa_decode(**inputs, use_kernel=use_kernel))
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rows", type=int, default=1, help="G-SWA loop rows (loops - 1)")
    parser.add_argument("--window", type=int, default=65, help="ring slots (keys incl. query)")
    parser.add_argument("--lengths", default="512,2048,8192", help="global cache lengths")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)

    dtype = getattr(mx, args.dtype)
    paths = {"ops": False, "kernel": True} if mx.metal.is_available() else {"ops": False}
    if "kernel" not in paths:
        print("Metal is not available here: timing the composed ops only")
    print(f"{'length':>8} " + " ".join(f"{name + ' us':>12} {name + ' GB/s':>12}" for name in paths))
    for length in (int(n) for n in args.lengths.split(",")):
        inputs = make_inputs(args.batch, args.heads, args.kv_heads, args.rows, args.head_dim,
                             length, args.window, dtype)
        kv_bytes = sum(inputs[k].nbytes for k in ("global_k", "global_v", "ring_k", "ring_v"))
        cells = []
        for use_kernel in paths.values():
            seconds = time_call(inputs, use_kernel, args.iters)
            cells.append(f"{seconds * 1e6:>12.1f} {kv_bytes / seconds / 1e9:>12.1f}")
        print(f"{length:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
