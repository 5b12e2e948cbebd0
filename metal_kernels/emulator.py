"""Run `mx.fast.metal_kernel` kernels on the CPU: the same body, the same signature, the same grid.

`EmulatedKernel` takes the constructor and call arguments of `mx.fast.metal_kernel` and:
  1. generates the Metal source exactly as MLX does (`metal_source`: a port of MLX's
     `write_signature` in mlx/backend/common/metal_kernel.cpp: inputs as
     `const device T* name [[buffer(i)]]` (`constant` below 8 elements, `&` for 0-d),
     `name_shape/_strides/_ndim` when the body mentions them, outputs as `device T*`,
     the template parameters, and the thread attributes the body mentions);
  2. turns it into C++: metal_emu.h (Metal types, address spaces, barriers and simdgroup
     collectives on std::threads) + that source with its [[...]] attributes dropped + a launcher
     that passes the buffers in MLX's binding order and the attributes of each thread;
  3. builds it once with g++ -O2 -pthread into a shared library cached by source hash
     ($PLT_METAL_EMU_CACHE, default ~/.cache/plt_port/metal_emu), loads it with ctypes and runs
     it over the same grid and threadgroup as dispatchThreads would.

Inputs are passed row-contiguous (as with `ensure_row_contiguous=True`); outputs not covered
by `init_value` start as NaN bytes, so a kernel that leaves an element unwritten shows it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from plt_port.errors import PLTError

EMU_HEADER = Path(__file__).with_name("metal_emu.h")
EMU_RUNTIME = Path(__file__).with_name("metal_emu_runtime.cpp")
CXX_FLAGS = ["-std=c++20", "-O2", "-pthread", "-fPIC", "-w"]

# Inputs with fewer elements are passed in the constant address space (MLX: max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, type) in MLX's order; an attribute is a parameter iff its name occurs in the body.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# mx dtype -> (MLX's Metal type string, numpy dtype of the raw buffer)
_TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.bool_: ("bool", np.bool_),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
}


class EmulatorError(PLTError):
    """The emulated kernel could not be generated, built or run."""


def type_string(dtype) -> str:
    if dtype not in _TYPES:
        raise EmulatorError(f"dtype {dtype} is not supported by custom Metal kernels")
    return _TYPES[dtype][0]


def _template_arg_string(value) -> str:
    if isinstance(value, bool):  # MLX streams a bool without boolalpha
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


def template_def(template) -> str:
    """`<float, 64, 1>`: the template arguments as MLX instantiates them ("" without any)."""
    return "<" + ", ".join(_template_arg_string(v) for _, v in template) + ">" if template else ""


def metal_source(name, input_names, output_names, source, header, inputs, output_dtypes,
                 template=(), atomic_outputs=False):
    """(kernel_name, Metal source) as `mx.fast.metal_kernel` generates them for this call,
    statement for statement after MLX's `write_signature` (including where it closes the
    parameter list: `index` there also counts shape/stride buffers)."""
    template = list(template or ())
    kernel_name = "custom_kernel_" + name
    if template:
        kernel_name += "_" + re.sub(r"<|>|(, )", "_", template_def(template))[:-1]
    for arr in inputs:
        kernel_name += "_" + type_string(arr.dtype)
        if arr.ndim == 0:
            kernel_name += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + type_string(dtype)
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]

    out = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in template]
        out += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    out += f"[[kernel]] void {kernel_name}(\n"
    index = 0
    for name_i, arr in zip(input_names, inputs):
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        out += f"  const {location} {type_string(arr.dtype)}{ref} {name_i} [[buffer({index})]],\n"
        index += 1
        if arr.ndim > 0:
            for suffix, ctype in (("_shape", "int*"), ("_strides", "int64_t*"), ("_ndim", "int&")):
                if name_i + suffix in source:
                    out += f"  const constant {ctype} {name_i}{suffix} [[buffer({index})]],\n"
                    index += 1
    for name_o, dtype in zip(output_names, output_dtypes):
        type_o = f"atomic<{type_string(dtype)}>" if atomic_outputs else type_string(dtype)
        out += f"  device {type_o}* {name_o} [[buffer({index})]]"
        last = index >= len(inputs) + len(output_names) - 1 and not attributes
        out += ") {\n" if last else ",\n"
        index += 1
    if attributes:
        out += ",\n".join(attributes) + ") {\n"
    out += source + "\n}\n"
    if template:
        spec = kernel_name + template_def(template)
        out += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({spec}) {spec};\n'
    return kernel_name, out


def _cpp_source(kernel_name, metal, template_args, param_types, attributes):
    """The C++ translation unit: header, the Metal source minus [[...]], a launcher."""
    known = "|".join(["kernel", r"buffer\(\d+\)", r'host_name\("[^"]*"\)'] + attributes)
    body = re.sub(rf"\[\[({known})\]\]", "", metal)
    args = []
    for i, ctype in enumerate(param_types):
        if ctype.endswith("&"):
            args.append(f"*reinterpret_cast<{ctype[:-1]}*>(buffers[{i}])")
        else:
            args.append(f"reinterpret_cast<{ctype}>(buffers[{i}])")
    args += [f"a.{name}" for name in attributes]
    joined = ",\n      ".join(args)
    return f"""#include "metal_emu.h"
{body}
static void emu_entry(const emu::Attrs& a, void* context) {{
  void** buffers = static_cast<void**>(context);
  {kernel_name}{template_args}(
      {joined});
}}

extern "C" int emu_run(void** buffers, const uint32_t* grid, const uint32_t* group,
                       uint32_t jitter_seed, double timeout_s, char* error, int error_len) {{
  return emu::launch(grid, group, jitter_seed, timeout_s, error, error_len, emu_entry, buffers);
}}
"""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "plt_port" / "metal_emu"
    return Path(os.environ.get("PLT_METAL_EMU_CACHE", default))


_libraries: dict[str, ctypes.CDLL] = {}
_build_lock = threading.Lock()


def _compile(args: list[str], output: Path) -> None:
    """Run g++ into a temporary file next to `output`, then rename it into place (atomic)."""
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        tmp_out = Path(tmp) / output.name
        cmd = ["g++", *CXX_FLAGS, f"-I{EMU_HEADER.parent}", *args, "-o", str(tmp_out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise EmulatorError("the Metal emulator needs a C++20 compiler: g++ not found") from e
        if proc.returncode != 0:
            raise EmulatorError(f"g++ failed on {args[-1]}:\n{proc.stderr[-4000:]}")
        os.replace(tmp_out, output)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join([*parts, " ".join(CXX_FLAGS)]).encode()).hexdigest()[:24]


def _runtime_object(directory: Path) -> Path:
    """metal_emu_runtime.cpp (threads, barriers: slow to parse) compiled once per content."""
    obj = directory / f"runtime-{_digest(EMU_RUNTIME.read_text(), EMU_HEADER.read_text())}.o"
    if not obj.exists():
        _compile(["-c", str(EMU_RUNTIME)], obj)
    return obj


def build_library(cpp: str) -> ctypes.CDLL:
    """Compile `cpp` with the runtime into a shared library cached by content; load it."""
    key = _digest(cpp, EMU_HEADER.read_text(), EMU_RUNTIME.read_text())
    with _build_lock:
        if key in _libraries:
            return _libraries[key]
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        lib_path = directory / f"kernel-{key}.so"
        if not lib_path.exists():
            runtime = _runtime_object(directory)
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                src = Path(tmp) / "kernel.cpp"
                src.write_text(cpp)
                _compile(["-shared", str(runtime), str(src)], lib_path)
        lib = ctypes.CDLL(str(lib_path))
        lib.emu_run.restype = ctypes.c_int
        lib.emu_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint32),
                                ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_double,
                                ctypes.c_char_p, ctypes.c_int]
        _libraries[key] = lib
        return lib


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(x))


def _from_numpy(buf: np.ndarray, dtype) -> mx.array:
    out = mx.array(buf)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


class EmulatedKernel:
    """A drop-in for `mx.fast.metal_kernel(...)` that runs the kernel on the CPU."""

    def __init__(self, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False, compile_options=None):
        if not output_names:
            raise EmulatorError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise EmulatorError("atomic outputs are not emulated")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.attributes = [a for a, _ in METAL_ATTRIBUTES if a in source]

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup,
                 template=None, init_value=None, verbose=False, stream=None,
                 jitter_seed=0, timeout_s=120.0):
        """As `mx.fast.metal_kernel(...)(...)`, plus: `jitter_seed` != 0 sleeps threads at random
        before barriers and collectives; a barrier not reached within `timeout_s` fails."""
        if len(inputs) != len(self.input_names):
            raise EmulatorError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        if not len(output_shapes) == len(output_dtypes) == len(self.output_names):
            raise EmulatorError(f"expected {len(self.output_names)} output shapes and dtypes")
        inputs = [_as_array(x) for x in inputs]
        template = list(template or ())
        kernel_name, metal = metal_source(self.name, self.input_names, self.output_names,
                                          self.source, self.header, inputs, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{metal}\n```")

        buffers, param_types = [], []
        for name, arr in zip(self.input_names, inputs):
            buffers.append(_to_numpy(arr))
            param_types.append(f"const {type_string(arr.dtype)}" + ("&" if arr.ndim == 0 else "*"))
            if arr.ndim > 0:
                strides = np.cumprod((arr.shape[1:] + (1,))[::-1])[::-1]  # row-contiguous
                for suffix, value, ctype in (("_shape", np.array(arr.shape, np.int32), "const int*"),
                                             ("_strides", strides.astype(np.int64), "const int64_t*"),
                                             ("_ndim", np.array(arr.ndim, np.int32), "const int&")):
                    if name + suffix in self.source:
                        buffers.append(value)
                        param_types.append(ctype)
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            np_dtype = _TYPES[dtype][1]
            if init_value is None:
                buf = np.empty(tuple(shape), np_dtype)
                buf.view(np.uint8).fill(0xFF)
            else:
                buf = np.array(_to_numpy(mx.full(tuple(shape), init_value, dtype)))
            outputs.append(buf)
            buffers.append(buf)
            param_types.append(f"{type_string(dtype)}*")

        lib = build_library(_cpp_source(kernel_name, metal, template_def(template), param_types,
                                        self.attributes))
        pointers = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        grid_arr = (ctypes.c_uint32 * 3)(*grid)
        group_arr = (ctypes.c_uint32 * 3)(*threadgroup)
        error = ctypes.create_string_buffer(1024)
        rc = lib.emu_run(pointers, grid_arr, group_arr, jitter_seed, timeout_s, error, len(error))
        if rc != 0:
            raise EmulatorError(f"emulated kernel {self.name!r} failed: {error.value.decode()}")
        return [_from_numpy(buf, dtype) for buf, dtype in zip(outputs, output_dtypes)]
