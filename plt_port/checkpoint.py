"""Model directories in the Hugging Face layout (SPEC section 5), framework-free.

Tensors travel as numpy arrays (bf16 as `ml_dtypes.bfloat16`): every backend converts from
there. The safetensors header is read directly, so shapes are checked before any data is read;
each tensor is then materialised once, in the precision asked for, from a read-only memory map
of its bytes (no whole-model copy in another precision). Nothing here can execute code from a
file: no pickle, ever.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from .atomic import atomic_dir
from .config import PLTConfig, canonical_name
from .errors import PLTError
from .files import check_regular_file, parse_json, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# copied into exports with the weights: what a generate request reads besides config.json
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
           "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# precisions by the names of config.json's torch_dtype (and of every --dtype option)
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


class CheckpointError(PLTError, ValueError):
    """A model directory that does not match its config."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a precision name (bf16: `ml_dtypes.bfloat16`)."""
    if name not in NUMPY_DTYPES:
        raise CheckpointError(f"precision must be one of {', '.join(NUMPY_DTYPES)}, got {name!r}")
    return NUMPY_DTYPES[name]


def expected_shapes(config: PLTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` must hold, with its shape."""
    d, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    H, G, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H * D, d),
            p + "self_attn.k_proj.weight": (G * D, d),
            p + "self_attn.v_proj.weight": (G * D, d),
            p + "self_attn.o_proj.weight": (d, H * D),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
        if config.is_v1:
            shapes[f"model.gate_projections.{i}.weight"] = (H, D)
            shapes[f"model.gate_projections.{i}.bias"] = (H,)
        elif config.gate_uses_hidden:
            shapes[p + "self_attn.plt_gate.weight"] = (H, d)
            shapes[p + "self_attn.plt_gate.bias"] = (H,)
            shapes[p + "self_attn.plt_gate.gate_norm.weight"] = (d,)
        else:
            shapes[p + "self_attn.plt_gate.weight"] = (H, D)
            shapes[p + "self_attn.plt_gate.bias"] = (H,)
    return shapes


def parameter_count(config: PLTConfig) -> int:
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


# ---- reading ---------------------------------------------------------------------------
def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a key given twice is an error (the safetensors library rejects it)."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {key!r} given twice")
        data[key] = value
    return data


def read_header(path: str) -> tuple[dict, int]:
    """(header, data offset) of a safetensors file, checked as the safetensors library does:
    entries well formed, and their byte ranges tiling the data section exactly."""
    file_size = check_regular_file(path, CheckpointError)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(100_000_000, file_size - 8):
                raise ValueError(f"header size {n} does not fit the file")
            raw = f.read(n)
        header = parse_json(raw, "header", CheckpointError, pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = file_size - 8 - n
        for name, info in header.items():
            check_entry(name, info, data_size)
        check_tiling(header, data_size)
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return header, 8 + n


def check_entry(name: str, info, data_size: int) -> None:
    """A header entry whose dtype, shape and byte range agree with each other and the file."""
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if not all(type(v) is int and v >= 0 for v in [*shape, start, end]):
            raise ValueError
        count = math.prod(shape)
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"tensor {name}: malformed entry {info!r}") from None
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"tensor {name}: unsupported dtype {dtype!r}")
    if not 0 <= start <= end <= data_size or end - start != count * np.dtype(_DTYPES[dtype]).itemsize:
        raise ValueError(f"tensor {name}: byte range {start}..{end} does not hold {dtype} "
                         f"{list(shape)} inside the file")


def check_tiling(header: dict, data_size: int) -> None:
    """Byte ranges in order of offset must follow each other with no gap or overlap and end
    at the end of the file: any other layout is a damaged or hand-made file."""
    position = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = info["data_offsets"]
        if start != position:
            raise ValueError(f"tensor {name}: starts at byte {start}, expected {position} "
                             f"(tensors must be contiguous and not overlap)")
        position = end
    if position != data_size:
        raise ValueError(f"the tensors end at byte {position} of a {data_size}-byte data section")


FINITE_CHECK_ELEMENTS = 1 << 24  # elements checked at a time: the bool mask stays small


def _all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    rows = max(1, FINITE_CHECK_ELEMENTS // flat.shape[1])
    return all(np.isfinite(flat[i:i + rows]).all() for i in range(0, len(flat), rows))


def _read_tensor(path: str, info: dict, data_offset: int, dtype=None) -> np.ndarray:
    """The tensor as an array of its own, in `dtype` (None: as stored), converted straight
    from a read-only map of its bytes; the map is gone when this returns."""
    start, end = info["data_offsets"]
    stored = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if end == start:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype or stored)
    mapped = np.memmap(path, stored, mode="r", offset=data_offset + start, shape=shape)
    if not _all_finite(mapped):  # NaN/inf weights make every logit NaN
        raise ValueError("holds NaN or infinite values")
    return np.array(mapped, dtype=dtype or stored)


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory, from its index when sharded."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid index (no 'weight_map' object)")
        outside = [f for f in weight_map.values() if not isinstance(f, str) or not f
                   or os.path.basename(f) != f]
        if outside:
            raise CheckpointError(f"{index}: shard names must be plain file names in the model "
                                  f"directory, got {outside}")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(model_dir, f))]
        if missing:
            raise CheckpointError(f"{model_dir}: index names shard files that are absent: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.exists(single):
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")
    return [single]


def check_shapes(model_dir: str, expected: dict[str, tuple[int, ...]],
                 shapes: dict[str, tuple[int, ...]], problems: list[str] = ()) -> None:
    """Raise one CheckpointError listing `problems` and every missing, unexpected and
    mis-shaped tensor of `shapes` (canonical names) against `expected`."""
    problems = list(problems)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    for name in sorted(set(expected) & set(shapes)):
        if tuple(shapes[name]) != tuple(expected[name]):
            problems.append(f"mis-shaped: {name} is {list(shapes[name])}, expected "
                            f"{list(expected[name])}")
    if problems:
        raise CheckpointError(f"{model_dir}: checkpoint does not match config.json\n  "
                              + "\n  ".join(problems))


class CheckpointTensors(Mapping):
    """The tensors of a checked model directory, each read (and checked finite) when it is
    looked up, in `dtype` (None: as stored). Nothing is cached: a consumer that converts
    tensor by tensor holds one at a time."""

    def __init__(self, model_dir: str, entries: dict, dtype=None):
        self.model_dir, self._entries, self.dtype = model_dir, entries, dtype

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, offset, stored_name = self._entries[name]
        try:
            return _read_tensor(path, info, offset, self.dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {stored_name} {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def open_tensors(model_dir: str | os.PathLike, config: PLTConfig | None = None,
                 dtype=None) -> CheckpointTensors:
    """The tensors of a model directory, checked strictly against `config`'s expected set
    before any is read. Missing, unexpected, mis-shaped and non-float tensors are collected
    and reported in one error. `dtype` (a numpy dtype, `ml_dtypes.bfloat16` for bf16)
    converts every tensor as it is read; None keeps the stored precision."""
    model_dir = os.fspath(model_dir)
    config = config or PLTConfig.from_file(model_dir)
    expected = expected_shapes(config)
    entries, problems = {}, []
    for path in weight_files(model_dir):
        header, offset = read_header(path)
        for name, info in header.items():
            if canonical_name(name) in entries:
                problems.append(f"duplicate: {name} and {entries[canonical_name(name)][3]} "
                                f"are the same tensor")
            entries[canonical_name(name)] = (path, info, offset, name)
    check_shapes(model_dir, expected,
                 {name: tuple(info["shape"]) for name, (_, info, _, _) in entries.items()},
                 problems)
    not_float = sorted(name for name, (_, info, _, _) in entries.items()
                       if info["dtype"] not in FLOAT_DTYPES)
    if not_float:
        raise CheckpointError(f"{model_dir}: weights must be floating point "
                              f"({', '.join(FLOAT_DTYPES)}); not: {', '.join(not_float)}")
    return CheckpointTensors(model_dir, entries, dtype)


def load_tensors(model_dir: str | os.PathLike, config: PLTConfig | None = None,
                 dtype=None) -> dict[str, np.ndarray]:
    """Every tensor of a model directory at once (see `open_tensors`): for small models and
    tests; converters go tensor by tensor through `open_tensors`."""
    return dict(open_tensors(model_dir, config, dtype).items())


# ---- writing ---------------------------------------------------------------------------
def write_tensors(out_dir: str, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int | None = None) -> None:
    """Write `tensors` into `out_dir` as one file, or as shards plus an index."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_model_file(src_dir: str, name: str, out_dir: str) -> None:
    """Copy the regular file `name` of a model directory with its permission bits, never
    wider: a link out of the model directory (to a private file, say) is refused."""
    src = os.path.join(src_dir, name)
    real_dir = os.path.realpath(src_dir)
    if not os.path.realpath(src).startswith(real_dir + os.sep):
        raise CheckpointError(f"{src}: links outside the model directory; copy the file in")
    check_regular_file(src, CheckpointError)
    mode = stat.S_IMODE(os.stat(src).st_mode)
    dst = os.path.join(out_dir, name)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def copy_tokenizer(src_dir: str | None, out_dir: str) -> None:
    if src_dir is None:
        return
    for name in TOKENIZER_FILES:
        if os.path.lexists(os.path.join(src_dir, name)):
            copy_model_file(src_dir, name, out_dir)


def check_model_dir(model_dir: str | os.PathLike) -> PLTConfig:
    """The config of `model_dir` once its config.json and every weight file header have been
    checked (any safetensors layout: quantized exports hold integer tensors too)."""
    model_dir = os.fspath(model_dir)
    config = PLTConfig.from_file(model_dir)
    for path in weight_files(model_dir):
        read_header(path)
    return config


def save_model_dir(out_dir: str | os.PathLike, config: PLTConfig,
                   tensors: Mapping[str, np.ndarray], tokenizer_dir: str | None = None,
                   max_shard_bytes: int | None = None) -> None:
    """Atomically write config.json, the weights and (copied) tokenizer files."""
    missing = sorted(set(expected_shapes(config)) - set(tensors))
    if missing:
        raise CheckpointError("refusing to save an incomplete model; missing: " + ", ".join(missing))
    with atomic_dir(out_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json())
        write_tensors(tmp, tensors, max_shard_bytes)
        copy_tokenizer(tokenizer_dir, tmp)
