"""Saved prompt caches: the state of one sequence after a prefix, as one safetensors file
(mlx-lm's `save_prompt_cache` / `load_prompt_cache`, for PLT states).

Tensors (numpy, bf16 as `ml_dtypes.bfloat16`), for n cached tokens, G KV heads, head dim D,
R = L - 1 rings, Wn = min(window, n):

  global.{i}.key|value            [G, n, D]        loop-1 K/V of layer i (dense), or
  global.{i}.key|value.packed     [G, n, D*bits/8] uint8, low nibble first (quantized),
  global.{i}.key|value.scales     [G, n, D/group]  and .biases: mlx-lm's affine groups
  ring.{i}.key|value              [R, G, Wn, D]    ring slots 0..Wn-1 (position p in p % window)
  carry                           [R, d]           the CLP carry (PLT with L > 1)

Metadata (`__metadata__`, strings): `format` (FORMAT), `version`, `model_hash` (see
`model_hash`), `model_type`, `loops`, `dtype` (the run dtype of the caches), `kv_quant`
("none" or "BITS/GROUP_SIZE"), `window`, `tokens` (a JSON list of the n token ids).

A file is loaded only into the model, loop count, dtype and KV quantization it was made
with; anything else is refused by name (`check_matches`).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .atomic import atomic_write_file
from .checkpoint import CheckpointError, _read_tensor, read_header, weight_files
from .errors import PLTError

FORMAT = "plt-port-prompt-cache"
VERSION = "1"
SAMPLE_BYTES = 1 << 20  # of each weight file's data, from its start and its end
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


QUANT_PARTS = ("packed", "scales", "biases")


def global_names(layer: int, kv: str, quantized: bool) -> list[str]:
    """Names of the tensors of one layer's global K or V."""
    base = f"global.{layer}.{kv}"
    return [f"{base}.{part}" for part in QUANT_PARTS] if quantized else [base]


class PromptCacheFileError(PLTError):
    """A prompt cache file that cannot be read, or one made for another model or setting."""


def model_hash(model_dir: str) -> str:
    """A cheap identity of a model: sha256 of config.json, the tokenizer files, and of each
    weight file its name, size, safetensors header (every tensor's name, dtype, shape and
    offsets) and the first and last MiB of its data. Another checkpoint, another tokenizer or
    retrained weights change it; reading it costs a few MiB, not the weights."""
    digest = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    for path in weight_files(model_dir):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            digest.update(f"{os.path.basename(path)}\0{size}\0".encode())
            header_size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_size, size)))
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def kv_quant_name(kv_quant) -> str:
    return "none" if kv_quant is None else f"{kv_quant.bits}/{kv_quant.group_size}"


def describe(model_dir_hash: str, config, loops: int, dtype: str, kv_quant,
             tokens: list[int]) -> dict[str, str]:
    """The metadata of a file (see the module docstring)."""
    return {"format": FORMAT, "version": VERSION, "model_hash": model_dir_hash,
            "model_type": config.model_type, "loops": str(loops), "dtype": dtype,
            "kv_quant": kv_quant_name(kv_quant), "window": str(config.window),
            "tokens": json.dumps([int(t) for t in tokens])}


def write(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write the file atomically (a temp file beside it, renamed into place)."""
    from safetensors.numpy import save_file

    def save(tmp: str) -> None:
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, tmp,
                  metadata=metadata)

    atomic_write_file(path, save)


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a prompt cache file, or a PromptCacheFileError saying why not."""
    try:
        header, offset = read_header(path)
        with open(path, "rb") as f:
            f.seek(8)
            raw = json.loads(f.read(offset - 8))
        metadata = raw.get("__metadata__") or {}
        if metadata.get("format") != FORMAT:
            raise PromptCacheFileError(f"{path} is not a plt-port prompt cache (its metadata "
                                       f"has no format {FORMAT!r}); make one with plt-port "
                                       f"cache-prompt")
        if metadata.get("version") != VERSION:
            raise PromptCacheFileError(f"{path}: prompt cache version "
                                       f"{metadata.get('version')!r}, this plt-port reads "
                                       f"{VERSION!r}")
        arrays = {name: _read_tensor(path, info, offset) for name, info in header.items()}
        metadata["tokens"] = json.loads(metadata["tokens"])
    except (CheckpointError, ValueError, KeyError, OSError) as exc:
        raise PromptCacheFileError(f"{path}: not a readable prompt cache ({exc})") from None
    return arrays, metadata


def check_matches(path: str, metadata: dict, expected: dict[str, str]) -> None:
    """Refuse a file made for another model, loop count, dtype or KV quantization, naming it."""
    what = {"model_hash": "model", "loops": "loop count", "dtype": "dtype",
            "kv_quant": "KV quantization"}
    for key, name in what.items():
        if metadata.get(key) != expected[key]:
            raise PromptCacheFileError(
                f"{path} was made for another {name} ({key}={metadata.get(key)}; this run has "
                f"{key}={expected[key]}): make it again with plt-port cache-prompt for this one")
