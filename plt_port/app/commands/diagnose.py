"""plt-port diagnose [--model DIR] [--loops 1..4] [--text FILE]: per-loop diagnostics (SPEC 8).

Prints the per-loop table and writes diagnostics.json, table.md and one PNG per metric.
"""

from __future__ import annotations

import os

from plt_port.app.cli import model_path


def add_arguments(parser):
    parser.add_argument("-m", "--model", metavar="DIR|NAME", type=model_path,
                        help="model directory or shipped model name (default: the packaged "
                             "default model)")
    parser.add_argument("--loops", default=None,
                        help="N or 1..N: analyse loops 1..N (default: the checkpoint's count); "
                             "one forward at N loops gives every loop r <= N")
    parser.add_argument("--text", help="UTF-8 text file to analyse (default: the held-out split)")
    parser.add_argument("--out", help="output folder (default: diagnostics/<model>-loops<N>)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="token budget taken from the start of the text (default 16384)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")


def run(args):
    from plt_port import diagnostics

    model_dir = args.model
    if model_dir is None:
        from plt_port.family import default_model_dir
        model_dir = default_model_dir()
    text = None
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise diagnostics.DiagnosticsError(f"--text {args.text}: not UTF-8 ({exc})") from None
    result = diagnostics.diagnose(model_dir, args.loops, text, seq_len=args.seq_len,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens)
    name = os.path.basename(os.path.normpath(model_dir))
    out_dir = args.out or os.path.join("diagnostics", f"{name}-loops{result['loops']}")
    diagnostics.write_outputs(result, out_dir)
    print(f"{name}: {result['tokens']} tokens in {result['windows']} windows of "
          f"{result['seq_len']}, loops 1..{result['loops']} (trained with "
          f"{result['trained_loops']})")
    print(diagnostics.format_table(result))
    print(f"wrote {out_dir}/diagnostics.json, table.md and one PNG per metric")
    return 0
