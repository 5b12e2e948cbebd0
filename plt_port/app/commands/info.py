"""plt-port info MODEL [--context N] [--loops N] [--batch N]: parameters, weight bytes at each
precision, KV-cache bytes and the peak memory of each backend and export, from config.json
alone (a model directory or the path of its config.json: nothing else is downloaded).
"""

from __future__ import annotations

from plt_port.app.cli import positive_int


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="model directory or its config.json")
    parser.add_argument("--context", type=positive_int, default=4096,
                        help="positions held in the KV cache (default 4096)")
    parser.add_argument("--loops", type=int, help="inference loop count (default: the model's)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences (default 1)")


def run(args):
    from plt_port.config import PLTConfig
    from plt_port.sizing import report

    config = PLTConfig.from_file(args.model)
    print(report(config, args.context, config.resolve_loops(args.loops), args.batch))
    return 0
