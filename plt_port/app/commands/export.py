"""plt-port export {onnx,mlx} MODEL_DIR OUT_DIR [options]: each target's options live in its exporter."""

from __future__ import annotations

import importlib

from plt_port.app.cli import model_path

TARGETS = {
    "onnx": ("exporters.onnx_export", "ONNX graphs with the plt::GatedSlidingWindowAttention op"),
    "mlx": ("exporters.mlx_export", "an MLX model directory (optionally quantized)"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module, help_text) in TARGETS.items():
        target = sub.add_parser(name, help=help_text, description=help_text)
        target.add_argument("model_dir", type=model_path,
                            help="PyTorch PLT model directory (HF layout) or shipped model name")
        target.add_argument("out_dir", help="output directory (written atomically)")
        importlib.import_module(module).add_arguments(target)


def run(args):
    return importlib.import_module(TARGETS[args.target][0]).run(args)
