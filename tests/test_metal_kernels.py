"""The fused G-SWA Metal kernel, run on Linux through the CPU emulator of mx.fast.metal_kernel.

The emulator compiles the kernel body with the signature MLX generates (checked byte for byte
against MLX's own generator through mx.export_function), runs it over the same grid on real
threads with real barriers, and the outputs are compared with the composed-ops reference.
Mutated kernels (a barrier removed, a window or length off by one) must fail the comparison.
On a Mac, the gated test runs the real kernel on the GPU.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from metal_kernels.emulator import EmulatedKernel, EmulatorError, metal_source
from metal_kernels.gswa import (GSWAKernelError, MetalUnavailableError, gswa_decode,
                                gswa_decode_ops, kernel_call_args, kernel_spec,
                                launch_gswa_decode, metal_kernel)
from plt_port.errors import PLTError

TOL = 1e-5
HAS_METAL = mx.metal.is_available()

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None,
                                    reason="the Metal emulator compiles kernels with g++")


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    G: int
    R: int
    D: int
    S: int
    W: int
    lengths: tuple
    dtype: object = mx.float32
    out_dtype: object = mx.float32

    def inputs(self, seed: int) -> dict:
        """Random caches; slots past the valid ones hold random values too, so a mask that
        lets one through changes the output."""
        rng = np.random.default_rng(seed)

        def normal(*shape):
            return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(self.dtype)

        B, H, G, R, D, S, W = self.B, self.H, self.G, self.R, self.D, self.S, self.W
        return dict(q=normal(B, H, R, D), global_k=normal(B, G, S, D), global_v=normal(B, G, S, D),
                    ring_k=normal(R, B, G, W, D), ring_v=normal(R, B, G, W, D),
                    gate=mx.array(rng.uniform(0, 1, (B, H, R)).astype(np.float32)),
                    lengths=mx.array(np.array(self.lengths, np.int32)), scale=D ** -0.5)


# Global length 1; lengths that are no multiple of the simdgroups splitting the keys; rings
# not yet full, exactly full and wrapped; GQA ratios 1, 2, 4, 5; head dims 16, 64, 128; fp32,
# fp16 and bf16 inputs (fp32 accumulation, fp32 or bf16 output).
CASES = {
    "gqa1-d64-global1-wrapped": Case(2, 2, 2, 2, 64, 33, 8, (1, 33)),
    "gqa1-d64-ring-partial-full-wrapped": Case(3, 4, 4, 1, 64, 50, 16, (5, 16, 47)),
    "gqa2-d128-three-rows": Case(2, 4, 2, 3, 128, 70, 8, (9, 70)),
    "gqa5-d128-window65": Case(1, 10, 2, 1, 128, 140, 65, (130,)),
    "gqa2-d16-tiny-model": Case(2, 4, 2, 1, 16, 12, 8, (3, 12)),
    "fp16-gqa2-d64": Case(2, 4, 2, 2, 64, 30, 8, (1, 30), mx.float16),
    "bf16-gqa4-d128": Case(1, 8, 2, 1, 128, 45, 16, (45,), mx.bfloat16),
    # rings of min(window, capacity) slots: one as long as a capacity below the window, and
    # the 8192-slot ring of a Loop-Thinking-shaped model, wrapped and partly filled
    "ring-of-the-capacity": Case(2, 4, 2, 1, 64, 40, 40, (12, 40)),
    "window8192-wrapped-partial": Case(2, 2, 1, 1, 16, 8300, 8192, (8200, 3000)),
}
BF16_OUT = Case(2, 4, 2, 2, 64, 30, 8, (7, 29), mx.bfloat16, mx.bfloat16)


def reference(inputs: dict) -> mx.array:
    """The composed-ops result on the same values in fp32."""
    upcast = {k: v.astype(mx.float32) if isinstance(v, mx.array) and k != "lengths" else v
              for k, v in inputs.items()}
    return gswa_decode_ops(**upcast)


def max_abs_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))


@pytest.fixture(scope="module")
def emulated():
    return EmulatedKernel(**kernel_spec())


# ---- the kernel on the emulator vs the composed ops -----------------------------------------

@needs_compiler
@pytest.mark.parametrize("jitter_seed", [0, 3], ids=["plain", "jitter"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_ops(emulated, name, jitter_seed):
    case = CASES[name]
    inputs = case.inputs(seed=len(name))
    out = launch_gswa_decode(emulated, **inputs, out_dtype=case.out_dtype, jitter_seed=jitter_seed)
    assert out.dtype == case.out_dtype and out.shape == (case.B, case.H, case.R, case.D)
    assert max_abs_diff(out, reference(inputs)) <= TOL


@needs_compiler
def test_kernel_matches_ops_on_random_shapes(emulated):
    rng = np.random.default_rng(2026)
    for trial in range(4):
        G = int(rng.integers(1, 4))
        R = int(rng.integers(1, 4))
        B = max(int(rng.integers(1, 4)), -(-8 // (G * R)))  # gate of >= 8 values: one build
        S = int(rng.integers(1, 90))
        W = int(rng.integers(1, 20))
        lengths = tuple(int(n) for n in rng.integers(1, S + 1, B))
        case = Case(B, G, G, R, 64, S, W, lengths)
        inputs = case.inputs(seed=trial)
        err = max_abs_diff(launch_gswa_decode(emulated, **inputs), reference(inputs))
        assert err <= TOL, (case, err)


@needs_compiler
def test_bf16_output_is_the_rounded_fp32_result(emulated):
    inputs = BF16_OUT.inputs(seed=3)
    out = launch_gswa_decode(emulated, **inputs)  # output dtype = q dtype
    assert out.dtype == mx.bfloat16
    ref = np.array(reference(inputs))
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 8)  # bf16 keeps 8 significant bits
    assert np.all(np.abs(np.array(out.astype(mx.float32)) - ref) <= half_ulp + TOL)


def spec_gswa_numpy(inputs: dict) -> np.ndarray:
    """SPEC section 2 written as plain loops: head h reads KV head h // (H / G); the global
    branch sees slots < length, the ring of row r its first min(length, W) slots."""
    q, gk, gv, rk, rv, gate = (np.array(inputs[k].astype(mx.float32), np.float64) for k in
                               ("q", "global_k", "global_v", "ring_k", "ring_v", "gate"))
    lengths, scale = np.array(inputs["lengths"]), inputs["scale"]
    B, H, R, D = q.shape
    n_rep, W = H // gk.shape[1], rk.shape[3]

    def attend(query, keys, values):
        scores = keys @ query * scale
        p = np.exp(scores - scores.max())
        return p @ values / p.sum()

    out = np.zeros((B, H, R, D))
    for b in range(B):
        n_glob, n_ring = lengths[b], min(lengths[b], W)
        for h in range(H):
            g = h // n_rep
            for r in range(R):
                y_glob = attend(q[b, h, r], gk[b, g, :n_glob], gv[b, g, :n_glob])
                y_loc = attend(q[b, h, r], rk[r, b, g, :n_ring], rv[r, b, g, :n_ring])
                out[b, h, r] = gate[b, h, r] * y_glob + (1 - gate[b, h, r]) * y_loc
    return out


@pytest.mark.parametrize("name", ["gqa1-d64-ring-partial-full-wrapped", "gqa5-d128-window65"])
def test_ops_reference_follows_the_spec(name):
    inputs = CASES[name].inputs(seed=len(name))
    assert np.abs(np.array(reference(inputs)) - spec_gswa_numpy(inputs)).max() <= TOL


# ---- mutations: a broken kernel must fail --------------------------------------------------

BARRIER = "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);"
MUTATIONS = {  # name: (text, occurrence, replacement)
    "no-barrier-before-merge": (BARRIER, 0, ""),
    "no-barrier-before-sum": (BARRIER, 1, ""),
    "ring-window-off-by-one": ("metal::min(len, W)", 0, "metal::min(len + 1, W)"),
    "global-length-off-by-one": ("metal::min(len, S)", 0, "metal::min(len - 1, S)"),
}
MUTATION_CASE = Case(2, 4, 2, 2, 64, 40, 8, (5, 37))  # ring partial and wrapped


def mutate(source: str, text: str, occurrence: int, replacement: str) -> str:
    at = -1
    for _ in range(occurrence + 1):
        at = source.index(text, at + 1)
    return source[:at] + replacement + source[at + len(text):]


@needs_compiler
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_kernel_fails(name):
    source = kernel_spec()["source"]
    mutated = mutate(source, *MUTATIONS[name])
    assert mutated != source
    kernel = EmulatedKernel(**kernel_spec(mutated))
    inputs = MUTATION_CASE.inputs(seed=11)
    # jitter: threads sleep at random before barriers and collectives, so a race shows
    out = launch_gswa_decode(kernel, **inputs, jitter_seed=5)
    err = max_abs_diff(out, reference(inputs))
    assert not err <= TOL, f"mutation {name!r} went unnoticed (max abs diff {err})"


# ---- the emulator itself --------------------------------------------------------------------

COLLECTIVES_SOURCE = """
    const uint i = thread_position_in_grid.x;
    const float v = x[i];
    sums[i] = metal::simd_sum(v);
    maxes[i] = metal::simd_max(v);
    prefix[i] = metal::simd_prefix_exclusive_sum(v);
    down[i] = metal::simd_shuffle_down(v, ushort(3));
    xors[i] = metal::simd_shuffle_xor(v, ushort(5));
    threadgroup float staged[64];
    staged[thread_index_in_threadgroup] = v;
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    reversed[i] = staged[threads_per_threadgroup.x - 1 - thread_index_in_threadgroup];
"""
COLLECTIVE_OUTPUTS = ["sums", "maxes", "prefix", "down", "xors", "reversed"]


@needs_compiler
def test_emulated_collectives_and_threadgroup_memory():
    """Grid 100 in threadgroups of 64: the edge threadgroup has 36 threads (a 4-lane edge
    simdgroup). Expected values come from numpy, segment by segment."""
    n, group = 100, 64
    x = np.random.default_rng(0).integers(-50, 50, n).astype(np.float32)  # exact sums
    kernel = EmulatedKernel("collectives", ["x"], COLLECTIVE_OUTPUTS, COLLECTIVES_SOURCE)
    outs = kernel(inputs=[mx.array(x)], output_shapes=[(n,)] * 6,
                  output_dtypes=[mx.float32] * 6, grid=(n, 1, 1), threadgroup=(group, 1, 1))
    got = dict(zip(COLLECTIVE_OUTPUTS, (np.array(o) for o in outs)))
    for start in range(0, n, group):
        tg = x[start:start + group]
        np.testing.assert_array_equal(got["reversed"][start:start + len(tg)], tg[::-1])
        for s0 in range(0, len(tg), 32):
            lanes = tg[s0:s0 + 32]
            at = slice(start + s0, start + s0 + len(lanes))
            width = len(lanes)
            np.testing.assert_array_equal(got["sums"][at], lanes.sum())
            np.testing.assert_array_equal(got["maxes"][at], lanes.max())
            np.testing.assert_array_equal(got["prefix"][at], np.cumsum(lanes) - lanes)
            for lane in range(width):  # lanes whose source lane exists
                if lane + 3 < width:
                    assert got["down"][at][lane] == lanes[lane + 3]
                if lane ^ 5 < width:
                    assert got["xors"][at][lane] == lanes[lane ^ 5]


@needs_compiler
def test_emulator_reports_a_barrier_not_every_thread_reaches():
    source = """
        if (thread_index_in_threadgroup > 0) {
            metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
        }
        out[thread_position_in_grid.x] = 1.0f;
    """
    kernel = EmulatedKernel("divergent", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match="not reached"):
        kernel(inputs=[mx.zeros((64,))], output_shapes=[(64,)], output_dtypes=[mx.float32],
               grid=(64, 1, 1), threadgroup=(64, 1, 1), timeout_s=1.0)


def mlx_generated_source(kernel, call: dict, arrays: list) -> bytes:
    """The Metal source MLX itself generates for `kernel(**call)`, read back from an exported
    function (MLX records custom kernels while export-tracing, even without a GPU)."""
    def fn(*xs):
        return kernel(**{**call, "inputs": [*xs, *call["inputs"][len(xs):]]})

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/kernel.mlxfn"
        mx.export_function(path, fn, *arrays)
        with open(path, "rb") as f:
            return f.read()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_generated_signature_equals_mlx(dtype):
    inputs = Case(2, 4, 2, 2, 64, 40, 8, (1, 37), dtype).inputs(seed=0)
    call = kernel_call_args(**inputs)
    spec = kernel_spec()
    _, ours = metal_source(spec["name"], spec["input_names"], spec["output_names"],
                           spec["source"], "", call["inputs"], call["output_dtypes"],
                           call["template"])
    data = mlx_generated_source(mx.fast.metal_kernel(**spec), call, call["inputs"][:7])
    at = data.find(ours.encode())
    assert at >= 8 and int.from_bytes(data[at - 8:at], "little") == len(ours.encode())


FEATURE_KERNELS = {  # body, output names
    "attributes": ("out[thread_position_in_grid.x] = x[x_strides[0] * x_ndim] + small[0] * s"
                   " + x_shape[0];", ["out"]),
    # MLX closes the parameter list after the first output here (its index counts x_shape)
    "shape-two-outputs-no-attributes": ("out[0] = x[0] + x_shape[0]; out2[0] = s;",
                                        ["out", "out2"]),
}


@pytest.mark.parametrize("name", list(FEATURE_KERNELS))
def test_generated_signature_equals_mlx_for_every_feature(name):
    """Template int/bool/dtype, a 0-d input, a small (constant) input, shape/strides/ndim."""
    source, outputs = FEATURE_KERNELS[name]
    names = (["x", "small", "s"], outputs)
    x, small = mx.zeros((4, 16), dtype=mx.float16), mx.zeros((3,), dtype=mx.int32)
    call = dict(inputs=[x, small, 2.0], template=[("T", mx.float32), ("N", 3), ("F", True)],
                grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(4, 16)] * len(outputs),
                output_dtypes=[mx.float16] * len(outputs))
    _, ours = metal_source("feat", *names, source, "// header\n",
                           [x, small, mx.array(2.0)], call["output_dtypes"], call["template"])
    data = mlx_generated_source(mx.fast.metal_kernel("feat", *names, source, header="// header\n"),
                                call, [x, small])
    at = data.find(ours.encode())
    assert at >= 8 and int.from_bytes(data[at - 8:at], "little") == len(ours.encode())


# ---- the entry point ------------------------------------------------------------------------

def test_entry_point_defaults_to_ops_without_metal():
    if HAS_METAL:
        pytest.skip("this machine has Metal: the default is the kernel (see the GPU test)")
    inputs = CASES["gqa2-d128-three-rows"].inputs(seed=1)
    expected = np.array(gswa_decode_ops(**inputs))
    np.testing.assert_array_equal(np.array(gswa_decode(**inputs)), expected)
    np.testing.assert_array_equal(np.array(gswa_decode(**inputs, use_kernel=False)), expected)
    with pytest.raises(MetalUnavailableError, match="Apple GPU") as info:
        gswa_decode(**inputs, use_kernel=True)
    assert isinstance(info.value, PLTError)


def test_bad_shapes_raise_one_clear_error():
    inputs = CASES["gqa2-d16-tiny-model"].inputs(seed=0)
    with pytest.raises(GSWAKernelError, match="ring_v has shape"):
        kernel_call_args(**{**inputs, "ring_v": inputs["ring_v"][:, :, :, :3]})
    with pytest.raises(GSWAKernelError, match="not a multiple"):
        kernel_call_args(**{**inputs, "q": mx.zeros((2, 3, 1, 16)), "gate": mx.zeros((2, 3, 1))})
    with pytest.raises(GSWAKernelError, match="share one dtype"):
        kernel_call_args(**{**inputs, "ring_v": inputs["ring_v"].astype(mx.float16)})


# ---- real hardware --------------------------------------------------------------------------

@pytest.mark.accelerator
@pytest.mark.skipif(not HAS_METAL, reason="needs an Apple-silicon GPU: mx.metal.is_available() "
                    "is False on this machine (the kernel is covered by the CPU emulator here)")
@pytest.mark.parametrize("name", list(CASES))
def test_metal_kernel_matches_ops_on_gpu(name):
    case = CASES[name]
    inputs = case.inputs(seed=len(name))
    out = launch_gswa_decode(metal_kernel(), **inputs, out_dtype=case.out_dtype)
    assert max_abs_diff(out, reference(inputs)) <= TOL
    if case.dtype == mx.float32:  # the model's path
        assert max_abs_diff(gswa_decode(**inputs), reference(inputs)) <= TOL


# ---- the kernel inside the MLX model ---------------------------------------------------------

@needs_compiler
@pytest.mark.parametrize("window", [[7, 0], [8191, 0]], ids=["rings-wrap", "window8192"])
def test_mlx_backend_decodes_the_same_through_the_emulated_kernel(make_model, monkeypatch,
                                                                  window):
    """The MLX backend's decode with G-SWA routed through the emulated kernel gives the
    logits of its composed-ops path: real cache layouts, 3 loops, rings that wrap, and the
    rings of a window-8192 model (as long as the capacity, 32 slots)."""
    from runtimes.backends import backend_unavailable_reason, load_backend

    if backend_unavailable_reason("mlx"):
        pytest.skip(backend_unavailable_reason("mlx"))
    from runtimes.models import mlx_model  # the module whose gswa_decode the model calls

    model_dir = make_model(plt_num_loops=3, plt_window_size=window)
    prompts = [[5, 9, 23, 7, 41, 3], [8, 2]]
    steps = np.array([[11, 12], [13, 14], [15, 16], [17, 18], [19, 20], [21, 22], [23, 24],
                      [25, 26], [27, 28]])

    def decode(mode):
        backend = load_backend("mlx", model_dir, loops=3, kernel="auto")
        state, _ = backend.prefill(prompts, max_tokens=32)
        return np.stack([backend.step(state, tokens, mode=mode) for tokens in steps])

    emulated = EmulatedKernel(**kernel_spec())
    calls = []

    def gswa_via_emulator(q, global_k, global_v, ring_k, ring_v, gate, lengths, scale,
                          use_kernel=None, kv_quant=None):
        assert kv_quant is None
        calls.append(q.shape)
        return launch_gswa_decode(emulated, q, global_k, global_v, ring_k, ring_v, gate,
                                  lengths, scale)

    mx.disable_compile()  # the emulator evaluates its inputs: no tracing around it
    try:
        for mode in ("clp", "naive"):
            with_ops = decode(mode)
            with monkeypatch.context() as patch:
                patch.setattr(mlx_model, "gswa_decode", gswa_via_emulator)
                with_kernel = decode(mode)
            assert calls, "the model never called gswa_decode"
            assert np.abs(with_kernel - with_ops).max() <= TOL, mode
            calls.clear()
    finally:
        mx.enable_compile()
