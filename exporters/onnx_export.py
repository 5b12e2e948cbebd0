"""`plt-port export onnx MODEL_DIR OUT_DIR [--dtype float32|float16] [--loops N]`.

Writes, atomically:
  prefill.onnx   T tokens per sequence (also the naive decode step with T = 1)
  decode.onnx    the CLP decode step (PLT checkpoints with loops > 1 only)
  weights.bin    the external data of both graphs, every tensor stored once
  plt_onnx.json  inputs, outputs, dims, loop settings and in-place aliases, for any runtime
  config.json and the tokenizer files of the source model
Needs only `onnx` and numpy (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from plt_port import checkpoint
from plt_port.atomic import OUTPUT_MARKER, atomic_dir
from plt_port.config import PLTConfig
from plt_port.errors import PLTError
from plt_port.files import check_regular_file, read_json_object

MANIFEST = "plt_onnx.json"
WEIGHTS = "weights.bin"
GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
FORMAT_VERSION = 2  # 2: "files" (size and sha256 of every file) for check_export


class ExportError(PLTError):
    pass


def add_arguments(parser):
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="weights, activations and caches dtype (logits are always fp32)")
    parser.add_argument("--loops", type=int, default=None,
                        help="loop count baked into the graphs (default: the checkpoint's)")


def run(args):
    out_dir = export(args.model_dir, args.out_dir, dtype=args.dtype, loops=args.loops)
    print(f"exported ONNX graphs to {out_dir}")


def _value_info(values) -> list[dict]:
    def dim(d):
        return d.dim_param if d.HasField("dim_param") else d.dim_value

    from onnx import helper
    return [{"name": v.name,
             "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [dim(d) for d in v.type.tensor_type.shape.dim]} for v in values]


def manifest(config: PLTConfig, loops: int, dtype: str, models: dict, weights,
             files: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "dtype": dtype,
        "loops": loops,
        "clp": "decode" in models,
        "window": config.window,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "weights_file": WEIGHTS,
        "files": files,
        "weights": weights.table(),
        "custom_op": {"domain": "plt", "name": "GatedSlidingWindowAttention", "version": 1,
                      "body": "model-local function (standard opset-23 ops)"},
        "dims": {
            "batch": "sequences in the batch",
            "chunk": "tokens per sequence in this prefill call (right-padded)",
            "capacity": "global KV slots per sequence (slot = position); "
                        "keep start + chunk <= capacity",
        },
        "inputs_meaning": {
            "input_ids": "token ids",
            "start": "tokens already in each sequence's caches (= position of its first new token)",
            "num_new": "valid tokens of each sequence in this chunk (prefill only)",
            "past_key_values.{i}.key/value": "loop-1 K/V of layer i, slot = position",
            "past_ring.{i}.key/value": "K/V of loop r >= 2 (index r-2), "
                                       "position p in slot p % window",
            "past_carry": "n(h) of loop r < loops (index r-1) at each sequence's last position",
        },
        # "state": each present output is the next call's past input; "in_place": outputs a
        # runtime may bind to their past input's buffer (the graph only scatters into them)
        "state": {"present.{i}.key": "past_key_values.{i}.key",
                  "present.{i}.value": "past_key_values.{i}.value",
                  "present_ring.{i}.key": "past_ring.{i}.key",
                  "present_ring.{i}.value": "past_ring.{i}.value",
                  "present_carry": "past_carry"},
        "in_place": {"prefill": ["present.{i}.key", "present.{i}.value"],
                     "decode": ["present.{i}.key", "present.{i}.value",
                                "present_ring.{i}.key", "present_ring.{i}.value"]},
        "graphs": {kind: {"file": GRAPHS[kind], "inputs": _value_info(m.graph.input),
                          "outputs": _value_info(m.graph.output)} for kind, m in models.items()},
    }


def export(model_dir: str, out_dir: str, dtype: str = "float32", loops: int | None = None) -> str:
    """Export a PyTorch (HF layout) PLT model directory to ONNX graphs in `out_dir`."""
    import onnx
    from tqdm import tqdm


    from .onnx_graph import (DTYPES, GraphBuilder, WeightsFile, build_decode, build_prefill,
                             onnx_weights)

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model_dir = os.fspath(model_dir)
    if os.path.exists(os.path.join(model_dir, MANIFEST)):
        raise ExportError(f"{model_dir} is already an ONNX export; "
                          "give the PyTorch model directory")
    config = PLTConfig.from_file(model_dir)
    loops = config.resolve_loops(loops)
    np_dtype = DTYPES[dtype][0]
    builders = {"prefill": build_prefill}
    if not config.is_v1 and loops > 1:
        builders["decode"] = build_decode

    with atomic_dir(out_dir, inputs=(model_dir,)) as tmp, \
            tqdm(total=2 + 2 * len(builders), desc="export onnx", unit="step") as bar:
        weights = WeightsFile(os.path.join(tmp, WEIGHTS), WEIGHTS)
        weights.write(onnx_weights(config, checkpoint.load_tensors(model_dir, config), np_dtype))
        bar.update(1)
        models = {}
        for kind, build in builders.items():
            models[kind] = build(GraphBuilder(config, loops, dtype, weights))
            path = os.path.join(tmp, GRAPHS[kind])
            onnx.save_model(models[kind], path)
            bar.update(1)
            onnx.checker.check_model(path, full_check=True)
            bar.update(1)
        checkpoint.copy_model_file(model_dir, "config.json", tmp)
        checkpoint.copy_tokenizer(model_dir, tmp)
        files = {name: file_record(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
                 if name != OUTPUT_MARKER}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest(config, loops, dtype, models, weights, files), f, indent=1)
        bar.update(1)
    return os.fspath(out_dir)


# ---- checking an export before use ---------------------------------------------------
def file_record(path: str) -> dict:
    """Size and sha256 of a file of an export, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_export(export_dir: str | os.PathLike, error: type[PLTError] = ExportError) -> dict:
    """The manifest of an ONNX export, once the export is known whole: the manifest's fields
    have their types, every file it lists is there with its recorded size (graphs also with
    their sha256: they are small, and a damaged graph fails deep inside ONNX Runtime), and
    every weight lies inside weights.bin. Any damage is an `error` naming it."""
    export_dir = os.fspath(export_dir)
    path = os.path.join(export_dir, MANIFEST)
    data = read_json_object(path, error)

    def fail(why):
        raise error(f"{path}: {why}; export again")

    def is_int(value):
        return type(value) is int and value >= 0

    if data.get("format_version") != FORMAT_VERSION:
        fail(f"format_version {data.get('format_version')!r}, this version reads "
             f"{FORMAT_VERSION}")
    if data.get("dtype") not in ("float32", "float16"):
        fail(f"dtype must be float32 or float16, got {data.get('dtype')!r}")
    if type(data.get("loops")) is not int:
        fail(f"loops must be an integer, got {data.get('loops')!r}")
    files, graphs, weights = data.get("files"), data.get("graphs"), data.get("weights")
    if not isinstance(files, dict) or not all(
            isinstance(r, dict) and is_int(r.get("bytes")) for r in files.values()):
        fail("'files' must map file names to {bytes, sha256}")
    if not isinstance(graphs, dict) or not graphs or "prefill" not in graphs or not all(
            isinstance(g, dict) and g.get("file") in files for g in graphs.values()):
        fail("'graphs' must list the prefill graph (and decode) among 'files'")
    if data.get("weights_file") not in files or not isinstance(weights, dict):
        fail("'weights_file' must be among 'files' and 'weights' a table")
    for name, record in files.items():
        if os.path.basename(name) != name:
            fail(f"file name {name!r} is not a plain name in the export")
        size = check_regular_file(os.path.join(export_dir, name), error)
        if size != record["bytes"]:
            fail(f"{name} has {size} bytes, {record['bytes']} expected (damaged or replaced)")
    for graph in graphs.values():
        if file_record(os.path.join(export_dir, graph["file"]))["sha256"] != \
                files[graph["file"]].get("sha256"):
            fail(f"{graph['file']} differs from the exported graph")
    weights_bytes = files[data["weights_file"]]["bytes"]
    for name, entry in weights.items():
        try:
            offset, length = entry["offset"], entry["length"]
            itemsize = np.dtype(entry["dtype"]).itemsize
            count = int(np.prod(entry["shape"], dtype=np.int64))
            ok = is_int(offset) and is_int(length) and all(is_int(d) for d in entry["shape"])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or length != count * itemsize or offset + length > weights_bytes:
            fail(f"weight {name}: entry {entry!r} does not lie inside {data['weights_file']}")
    return data
