"""MLX backend over runtimes/models/mlx_model.py (the mlx-lm style model file). Imports MLX, not torch.

`model_dir` is either a PyTorch (HF layout) model directory, exported on first use into the
export store (with `dtype` (default: the stored precision)/`quantize`/`group_size`), or an
MLX model directory loaded as it is: one written by `plt-port export mlx` (its config.json has
an `mlx_export` entry) or an mlx-lm quantized checkpoint (a `quantization` entry;
plt_port/quantization.py). `kv_bits` / `kv_group_size` / `quantized_kv_start` quantize the
global K/V as mlx-lm's QuantizedKVCache does (`plt_port.cache_layout.KVQuant`).
"""

from __future__ import annotations

import os

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from exporters import mlx_export
from exporters.export_store import ensure_exported
from plt_port import checkpoint
from plt_port.cache_layout import kv_quant_option
from plt_port.prompt_cache_file import global_names
from plt_port.quantization import Quantization, check_packed_dtypes, quantized_shapes

from runtimes.models import mlx_model
from .base import Backend, BackendError

KERNEL_CHOICES = {"auto": None, "on": True, "off": False}


class MLXBackend(Backend):
    name = "mlx"
    supports_rewind = True
    supports_verify = True

    def __init__(self, model_dir: str, loops: int | None = None, kernel: str = "auto",
                 dtype: str | None = None, quantize: int | None = None, group_size: int = 64,
                 kv_bits: int | None = None, kv_group_size: int | None = None,
                 quantized_kv_start: int = 0):
        if kernel not in KERNEL_CHOICES:
            raise BackendError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {kernel!r}")
        if kernel == "on" and not mx.metal.is_available():
            raise BackendError("kernel='on' needs the Metal G-SWA kernel, and Metal is not "
                               "available here (mx.metal.is_available() is False)")
        mlx_export.check_options(dtype or "float32", quantize, group_size)  # before any export
        model_dir = str(model_dir)
        checkpoint.check_model_dir(model_dir)
        self.source_dir = model_dir
        if mlx_export.is_mlx_dir(model_dir):
            if quantize is not None:
                raise BackendError(f"{model_dir} is already an MLX export; quantize from the "
                                   f"PyTorch model directory")
        else:
            model_dir = ensure_exported(model_dir, "mlx", mlx_export.export,
                                        dtype=dtype, quantize=quantize,
                                        group_size=group_size)
        super().__init__(model_dir, loops)
        self.kv_quant = kv_quant_option(kv_bits, kv_group_size, quantized_kv_start,
                                        self.config.head_dim, BackendError)
        if kernel == "on" and self.kv_quant is not None:
            raise BackendError("kernel='on': the Metal G-SWA kernel reads dense global K/V; a "
                               "quantized KV cache (kv_bits) runs the composed ops")
        self.kernel = kernel
        self.model = load_model(model_dir, dtype=getattr(mx, dtype) if dtype else None)
        self.model.use_gswa_kernel = KERNEL_CHOICES[kernel]
        self.run_dtype = str(self.model.model.norm.weight.dtype).removeprefix("mlx.core.")

    def peak_memory_bytes(self):
        return mx.get_peak_memory()

    def release_thread(self):
        mx.clear_streams()  # a worker's streams outliving it abort the process at exit

    # ---- caches ------------------------------------------------------------------------
    def new_caches(self, batch, capacity):
        kv_quant = self.kv_quant if self.quantize_kv_from_the_start() else None
        return self.model.allocate_cache(batch, capacity, self.loops, kv_quant)

    def grow_caches(self, caches, capacity):
        caches.grow(capacity, self.config.window)
        return caches

    def copy_slot(self, caches, slot, source_caches, source_slot, length):
        for kv, src in zip(caches.global_k + caches.global_v,
                           source_caches.global_k + source_caches.global_v):
            src = mlx_model.kv_map(lambda part: part[source_slot, :, :length], src)
            if caches.kv_quant != source_caches.kv_quant:  # a dense sequence, a quantized batch
                src = mlx_model.encode_kv(src, caches.kv_quant)
            for part, src_part in zip(mlx_model.kv_parts(kv), mlx_model.kv_parts(src)):
                part[slot, :, :length] = src_part
        # [R, B, G, Wr, D]: the batch is axis 1; a smaller ring holds its positions in its prefix
        shared = min(caches.ring_slots or 0, source_caches.ring_slots or 0)
        for ring, src in zip(caches.ring_k + caches.ring_v,
                             source_caches.ring_k + source_caches.ring_v):
            ring[:, slot] = 0
            ring[:, slot, :, :shared] = src[:, source_slot, :, :shared]
        if caches.carry is not None:
            caches.carry[:, slot] = source_caches.carry[:, source_slot]
        mx.eval(caches.arrays())
        return caches

    def cache_nbytes(self, caches):
        return caches.nbytes

    def global_quantized(self, caches):
        return caches.kv_quant is not None

    def quantize_global(self, caches):
        caches.quantize_global(self.kv_quant)
        return caches

    # ---- rewinds (rings [R, B, G, Wr, D] per layer, carry [R, B, d]) ------------------------
    def gather_ring(self, caches, slots, ring_slots):
        if not caches.ring_k:
            return None
        index = mx.array(ring_slots.astype(np.int32))[:, None, None, :, None]  # [k, 1, 1, m, 1]
        batch = mx.array(slots.astype(np.int32))
        rows = [mx.take_along_axis(ring[:, batch].transpose(1, 0, 2, 3, 4), index, axis=3)
                for ring in caches.ring_k + caches.ring_v]  # [k, R, G, m, D]
        mx.async_eval(rows)
        return rows

    def scatter_ring(self, caches, slot, ring_slots, rows, row, columns):
        index = mx.array(ring_slots.astype(np.int32))[None, None, :, None]
        picked = mx.array(columns.astype(np.int32))
        for ring_list, saved in ((caches.ring_k, rows[:len(caches.ring_k)]),
                                 (caches.ring_v, rows[len(caches.ring_k):])):
            for ring, layer_rows in zip(ring_list, saved):
                values = mx.take(layer_rows[row], picked, axis=2)  # [R, G, m', D]
                ring[:, slot] = mx.put_along_axis(ring[:, slot], index, values, axis=2)
        mx.eval(caches.arrays())
        return caches

    def gather_carry(self, caches, slots):
        if caches.carry is None:
            return None
        carry = caches.carry[:, mx.array(slots.astype(np.int32))].transpose(1, 0, 2)[:, :, None]
        mx.async_eval(carry)
        return [carry]  # [k, L-1, 1, d]

    def scatter_carry(self, caches, slot, carries, row, column):
        caches.carry[:, slot] = 0 if carries is None else carries[0][row, :, column]
        mx.eval(caches.carry)
        return caches

    def own_rows(self, arrays, row):
        rows = [mx.take(a, mx.array([row]), axis=0) for a in arrays]  # a gather: its own memory
        mx.eval(rows)
        return rows

    # ---- saved prompt caches (packed quantized values: uint32 here, uint8 in the file) ------
    def export_slot(self, caches, slot, length):
        arrays, held = {}, min(self.config.window, length)
        quantized = caches.kv_quant is not None
        for name, kvs in (("key", caches.global_k), ("value", caches.global_v)):
            for i, kv in enumerate(kvs):
                for part_name, part in zip(global_names(i, name, quantized), mlx_model.kv_parts(kv)):
                    arrays[part_name] = to_numpy(part[slot, :, :length])
        for name, rings in (("key", caches.ring_k), ("value", caches.ring_v)):
            for i, ring in enumerate(rings):
                arrays[f"ring.{i}.{name}"] = to_numpy(ring[:, slot, :, :held])
        if caches.carry is not None:
            arrays["carry"] = to_numpy(caches.carry[:, slot])
        return arrays

    def import_slot(self, caches, slot, arrays):
        quantized = caches.kv_quant is not None
        for name, kvs in (("key", caches.global_k), ("value", caches.global_v)):
            for i, kv in enumerate(kvs):
                for part_name, part in zip(global_names(i, name, quantized), mlx_model.kv_parts(kv)):
                    value = from_numpy(arrays[part_name], part.dtype)
                    part[slot, :, :value.shape[1]] = value
        for name, rings in (("key", caches.ring_k), ("value", caches.ring_v)):
            for i, ring in enumerate(rings):
                value = from_numpy(arrays[f"ring.{i}.{name}"], ring.dtype)
                ring[:, slot, :, :value.shape[2]] = value
        if caches.carry is not None:
            caches.carry[:, slot] = from_numpy(arrays["carry"], caches.carry.dtype)
        mx.eval(caches.arrays())
        return caches

    # ---- running -----------------------------------------------------------------------
    def prefill_chunk(self, caches, ids, start, num_new, trace=False, every_row=False):
        carries = [] if trace else None
        h = self.model.prefill(mx.array(ids.astype(np.int32)), caches, start, start + num_new,
                               carries)
        if not every_row:
            last = mx.array(self.last_token_index(num_new)[:, None, None])
            h = mx.take_along_axis(h, last, axis=1)[:, 0]
        logits = self.model.lm_logits(h)
        carries = [mx.stack(carries, axis=1)] if carries else None  # [B, L-1, C, d]
        mx.eval(logits, caches.arrays(), *(carries or []))
        logits = self._numpy(logits)
        return (logits, carries) if trace else logits

    def decode_rows(self, caches, tokens, positions, mode):
        return self.start_decode_rows(caches, tokens, positions, mode)()

    def start_decode_rows(self, caches, tokens, positions, mode):
        logits = self.model.step(mx.array(tokens.astype(np.int32)), caches, positions, mode)
        mx.async_eval(logits, caches.arrays())
        return lambda: self._numpy(logits)

    @staticmethod
    def _numpy(logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))


def to_numpy(array: mx.array) -> np.ndarray:
    """An MLX array as numpy: bf16 as `ml_dtypes.bfloat16`, packed uint32 as its bytes."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    if array.dtype == mx.uint32:
        return np.array(array.view(mx.uint8))
    return np.array(array)


def from_numpy(array: np.ndarray, dtype) -> mx.array:
    """`to_numpy` undone, into an array of `dtype`."""
    if dtype == mx.bfloat16:
        return mx.array(np.ascontiguousarray(array).view(np.uint16)).view(mx.bfloat16)
    if dtype == mx.uint32:
        return mx.array(np.ascontiguousarray(array)).view(mx.uint32)
    return mx.array(array)


# ---- loading ---------------------------------------------------------------------------------
def load_weights(model_dir: str) -> dict[str, mx.array]:
    weights = {}
    for path in checkpoint.weight_files(model_dir):
        weights.update(mx.load(path))
    return weights


def load_model(model_dir: str | os.PathLike, dtype=None) -> mlx_model.Model:
    """An MLX model directory -> evaluated Model; its tensors are checked against config.json
    (quantized modules: packed shapes of their quantization parameters) in one error."""
    model_dir = os.fspath(model_dir)
    args = mlx_model.ModelArgs.from_file(model_dir)
    model = mlx_model.Model(args)
    weights = model.sanitize(load_weights(model_dir))
    expected = checkpoint.expected_shapes(args)
    quantization = Quantization.from_config(args.extra)
    modules = quantization.plan(expected, set(weights)) if quantization else {}
    checkpoint.check_shapes(model_dir, quantized_shapes(expected, modules),
                            {name: tuple(w.shape) for name, w in weights.items()})
    check_packed_dtypes(modules, {name: str(w.dtype).removeprefix("mlx.core.")
                                  for name, w in weights.items()})
    if modules:
        nn.quantize(model, class_predicate=lambda path, _: path in modules
                    and modules[path].as_dict())
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    return model
