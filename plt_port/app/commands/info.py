"""plt-port info MODEL [--context N] [--loops N] [--batch N] [--kv-group-size N]: parameters,
weight bytes at each precision (the ONNX ones as the exporter writes weights.bin), KV-cache
bytes with the global K/V at 16, 8 and 4 bits, and the peak memory of each backend and export,
from config.json alone (a model directory or the path of its config.json: nothing else is
downloaded).
"""

from __future__ import annotations

from plt_port.app.cli import positive_int


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="model directory or its config.json")
    parser.add_argument("--context", type=positive_int, default=4096,
                        help="positions held in the KV cache (default 4096)")
    parser.add_argument("--loops", type=int, help="inference loop count (default: the model's)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences (default 1)")
    parser.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=None,
                        help="group size of the quantized KV rows (default 64, or the head "
                             "dim when smaller)")


def run(args):
    from exporters.onnx_export import quantization
    from exporters.onnx_layout import weights_file_bytes
    from plt_port.config import PLTConfig
    from plt_port.sizing import report

    config = PLTConfig.from_file(args.model)
    onnx_weights = {"float32": weights_file_bytes(config, "float32"),
                    "float16": weights_file_bytes(config, "float16"),
                    **{f"int{bits}": weights_file_bytes(config, "float32", quantization(bits))
                       for bits in (8, 4)}}
    print(report(config, args.context, config.resolve_loops(args.loops), args.batch,
                 onnx_weights, args.kv_group_size))
    return 0
