"""`plt-port export onnx MODEL_DIR OUT_DIR [--dtype float32|float16] [--loops N]
[--quantize 4|8 --block-size 32|64|128 --asymmetric --accuracy-level N]`.

Writes, atomically:
  model.onnx     one graph for prefill, CLP decode and naive decode (see exporters/onnx_graph.py)
  weights.bin    its external data, every tensor stored once
  plt_onnx.json  inputs, outputs, dims, loop settings, the call protocol and in-place
                 aliases, for any runtime
  config.json and the tokenizer files of the source model
The checkpoint is read, converted (and quantized) and written tensor by tensor: the export
holds about one layer's weights at a time. Needs `onnx` and numpy (no torch); quantizing
also needs onnxruntime (its block quantizer).
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
GRAPH = "model.onnx"
FORMAT_VERSION = 5  # 5: logit_rows (a speculative verify's logits); 4: rings of min(window,
# capacity) slots; 3: one graph per loop group
DTYPES = ("float32", "float16")
BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)


class ExportError(PLTError):
    pass


def add_arguments(parser):
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="activations and caches dtype, and weights unless quantized "
                             "(default float32: ONNX Runtime's CPU provider has few float16 "
                             "kernels and none for bfloat16; logits are always fp32)")
    parser.add_argument("--loops", type=int, default=None,
                        help="loop count baked into the graph (default: the checkpoint's)")
    parser.add_argument("--quantize", type=int, choices=BITS, default=None,
                        help="weight-only int4/int8 MatMul weights (com.microsoft MatMulNBits, "
                             "float32 activations; the embedding is kept in float16)")
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=32,
                        help="quantization block size (default 32)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="quantize with zero points (default: symmetric)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                        help="MatMulNBits compute precision on the CPU (default 4: int8, which "
                             "keeps multi-row CLP steps cheap)")


def run(args):
    quant = None if args.quantize is None else quantization(
        args.quantize, args.block_size, not args.asymmetric, args.accuracy_level)
    out_dir = export(args.model_dir, args.out_dir, dtype=args.dtype, loops=args.loops,
                     quant=quant)
    print(f"exported ONNX graph to {out_dir}")


def quantization(bits: int, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int = 4):
    """The checked `onnx_graph.Quantization` of these options."""
    from .onnx_graph import Quantization

    if bits not in BITS or block_size not in BLOCK_SIZES or accuracy_level not in range(5):
        raise ExportError(f"quantization: bits must be one of {BITS}, block size one of "
                          f"{BLOCK_SIZES} and accuracy level 0..4; got {bits}, {block_size}, "
                          f"{accuracy_level}")
    return Quantization(bits, block_size, bool(symmetric), accuracy_level)


def _value_info(values) -> list[dict]:
    def dim(d):
        return d.dim_param if d.HasField("dim_param") else d.dim_value

    from onnx import helper
    return [{"name": v.name,
             "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [dim(d) for d in v.type.tensor_type.shape.dim]} for v in values]


def manifest(config: PLTConfig, loops: int, dtype: str, quant, model, weights,
             files: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "dtype": dtype,
        "quantization": quant.manifest() if quant else None,
        "loops": loops,
        "clp": not config.is_v1 and loops > 1,
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
            "chunk": "tokens per sequence in this call (right-padded)",
            "groups": "loop groups in this call (1, or `loops` for a CLP step)",
            "capacity": "global KV slots per sequence (slot = position); "
                        "keep start + chunk <= capacity",
            "ring_slots": "slots of each ring: min(window, capacity); when the capacity "
                          "grows, the rings grow with it (new slots appended, zero)",
        },
        "inputs_meaning": {
            "input_ids": "token ids",
            "start": "tokens already in each sequence's caches (= position of its first new token)",
            "num_new": "valid tokens of each sequence in this chunk",
            "loops": "the loop number (1-based) of each row group",
            "logit_rows": "[R]: logits of each sequence's last R chunk positions (its last "
                          "valid token and the R-1 before it), [batch * R, vocab] sequence "
                          "by sequence; 1 but for a speculative verify (R = chunk)",
            "past_key_values.{i}.key/value": "loop-1 K/V of layer i, slot = position",
            "past_ring.{i}.key/value": "K/V of loop r >= 2 (index r-2), "
                                       "position p in slot p % window (< ring_slots)",
            "past_carry": "n(h) of loop r < loops (index r-1) at each sequence's last position",
            "past_hidden": "the previous loop's output over this chunk, as the previous call's "
                           "present_hidden gives it (PLT: n(h) shifted one token, the first "
                           "taking the carry from before the chunk); zeros for loop 1 and "
                           "CLP steps",
        },
        # how prefill and decode are run with the one graph (logits: of the last call)
        "calls": {
            "prefill": {"loops": "[r] for r = 1..loops in turn", "chunk": "the prompt chunk",
                        "past_hidden": "present_hidden of the previous call (zeros for r = 1)"},
            "clp_step": {"loops": "[1, ..., loops] at once", "chunk": 1,
                         "past_hidden": "zeros [batch, 1, hidden_size]"},
            "naive_step": {"loops": "[r] for r = 1..loops in turn", "chunk": 1,
                           "past_hidden": "present_hidden of the previous call (zeros for r = 1)"},
            "verify": {"loops": "[r] for r = 1..loops in turn, as prefill",
                       "chunk": "the last sampled token and the drafts (batch 1)",
                       "logit_rows": "chunk, in the last call (1 in the others)"},
        },
        # "state": each present output is the next call's past input; "in_place": outputs a
        # runtime may bind to their past input's buffer (the graph only scatters into them)
        "state": {"present.{i}.key": "past_key_values.{i}.key",
                  "present.{i}.value": "past_key_values.{i}.value",
                  "present_ring.{i}.key": "past_ring.{i}.key",
                  "present_ring.{i}.value": "past_ring.{i}.value",
                  "present_carry": "past_carry",
                  "present_hidden": "past_hidden"},
        "in_place": ["present.{i}.key", "present.{i}.value"],
        "graph": {"file": GRAPH, "inputs": _value_info(model.graph.input),
                  "outputs": _value_info(model.graph.output)},
    }


def export(model_dir: str, out_dir: str, dtype: str = "float32", loops: int | None = None,
           quant=None) -> str:
    """Export a PyTorch (HF layout) PLT model directory to the ONNX graph in `out_dir`;
    `quant`: an `onnx_graph.Quantization` (see `quantization`) or None."""
    import onnx
    from tqdm import tqdm

    from .onnx_graph import DTYPES as GRAPH_DTYPES
    from .onnx_graph import GraphBuilder, WeightsFile, build_step, onnx_weights, weight_count

    if dtype not in GRAPH_DTYPES:
        raise ExportError(f"dtype must be one of {sorted(GRAPH_DTYPES)} (ONNX Runtime has almost "
                          f"no bfloat16 CPU kernels), got {dtype!r}")
    if quant is not None and dtype != "float32":
        raise ExportError(f"a quantized export runs float32 activations; dtype {dtype} asked")
    model_dir = os.fspath(model_dir)
    if os.path.exists(os.path.join(model_dir, MANIFEST)):
        raise ExportError(f"{model_dir} is already an ONNX export; "
                          "give the PyTorch model directory")
    config = PLTConfig.from_file(model_dir)
    loops = config.resolve_loops(loops)
    tensors = checkpoint.open_tensors(model_dir, config)

    with atomic_dir(out_dir, inputs=(model_dir,)) as tmp:
        weights = WeightsFile(os.path.join(tmp, WEIGHTS), WEIGHTS)
        weights.write(tqdm(onnx_weights(config, tensors, GRAPH_DTYPES[dtype][0], quant),
                           total=weight_count(config, quant), desc="export onnx", unit="tensor"))
        model = build_step(GraphBuilder(config, loops, dtype, weights, quant))
        path = os.path.join(tmp, GRAPH)
        onnx.save_model(model, path)
        onnx.checker.check_model(path, full_check=True)
        checkpoint.copy_model_file(model_dir, "config.json", tmp)
        checkpoint.copy_tokenizer(model_dir, tmp)
        files = {name: file_record(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
                 if name != OUTPUT_MARKER}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest(config, loops, dtype, quant, model, weights, files), f, indent=1)
    return os.fspath(out_dir)


# ---- checking an export before use ---------------------------------------------------
_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256 this process read


def file_sha256(path: str) -> str:
    """The sha256 of `path`, streamed; read once per process while the file's path, size,
    mtime and inode stay the same (a large weights.bin is not re-hashed on every load)."""
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_record(path)["sha256"]
    return _VERIFIED[key]


def file_record(path: str) -> dict:
    """Size and sha256 of a file of an export, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_export(export_dir: str | os.PathLike, error: type[PLTError] = ExportError) -> dict:
    """The manifest of an ONNX export, once the export is known whole: the manifest's fields
    have their types, every file it lists is there with its recorded size, the graph and
    weights.bin also with their sha256 (weights.bin once per process: `file_sha256`), and
    every weight lies inside weights.bin (ONNX Runtime refuses external data out of the
    export's folder, and the backend turns its load errors into one). Any damage is an
    `error` naming it."""
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
    if data.get("dtype") not in DTYPES:
        fail(f"dtype must be float32 or float16, got {data.get('dtype')!r}")
    if type(data.get("loops")) is not int:
        fail(f"loops must be an integer, got {data.get('loops')!r}")
    files, graph, weights = data.get("files"), data.get("graph"), data.get("weights")
    if not isinstance(files, dict) or not all(
            isinstance(r, dict) and is_int(r.get("bytes")) for r in files.values()):
        fail("'files' must map file names to {bytes, sha256}")
    if not isinstance(graph, dict) or graph.get("file") not in files:
        fail("'graph' must name the graph file among 'files'")
    if data.get("weights_file") not in files or not isinstance(weights, dict):
        fail("'weights_file' must be among 'files' and 'weights' a table")
    for name, record in files.items():
        if os.path.basename(name) != name:
            fail(f"file name {name!r} is not a plain name in the export")
        size = check_regular_file(os.path.join(export_dir, name), error)
        if size != record["bytes"]:
            fail(f"{name} has {size} bytes, {record['bytes']} expected (damaged or replaced)")
    for name in (graph["file"], data["weights_file"]):
        if file_sha256(os.path.join(export_dir, name)) != files[name].get("sha256"):
            fail(f"{name} differs from the exported one (its sha256)")
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
