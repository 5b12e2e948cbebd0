"""plt-port serve-compare --vllm-python PYTHON [--formats v2,v1] [--streams 1,16] [--tokens 64]
[--threads 2] [--rounds 1] [--baseline CHECKOUT] [--json FILE]: `plt-port serve` and vLLM's OpenAI server side by side on the same
random ~25M-parameter fp32 model, measured by one HTTP client (`runtimes.serve_compare`): N
concurrent greedy streams of `--tokens` tokens each, tok/s = all tokens / wall time. Each server
runs alone, plt-port then vLLM for each format; prints a markdown table.
"""

from __future__ import annotations

import json
import sys

from plt_port.app.cli import positive_int, thread_count
from plt_port.app.commands.bench import comma_list
from plt_port.atomic import atomic_write_text
from plt_port.errors import PLTError


def add_arguments(parser):
    parser.add_argument("--vllm-python", required=True, metavar="PYTHON",
                        help="the Python of an environment with vLLM (e.g. "
                             ".venv-vllm/bin/python, `make .venv-vllm/.installed`)")
    parser.add_argument("--formats", type=comma_list(str), default=["v2", "v1"],
                        help="checkpoint formats, comma-separated (default v2,v1)")
    parser.add_argument("--streams", type=comma_list(int), default=[1, 16],
                        help="concurrent streams, comma-separated (default 1,16)")
    parser.add_argument("--tokens", type=positive_int, default=64,
                        help="tokens per stream (default 64)")
    parser.add_argument("--threads", type=thread_count, default=2,
                        help="CPU threads of each server (default 2)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="alternations of the two servers; the table shows each one's "
                             "best (default 1: one run each)")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also serve the plt-port of this checkout (e.g. a `git worktree` "
                             "of an older commit), before this one in each alternation")
    parser.add_argument("--json", metavar="FILE", help="also write every round's rows as JSON")


def run(args):
    from runtimes.serve_compare import FORMATS, best_rows, compare, table

    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or any(n < 1 for n in args.streams):
        raise PLTError(f"--formats must be among {', '.join(FORMATS)} and --streams >= 1, "
                       f"got {','.join(args.formats)} / {args.streams}")

    def progress(row):
        print(f"round {row['round'] + 1} {row['format']} {row['server']}: " + ", ".join(
            f"{n}: {tps:.1f} tok/s" for n, tps in row["tok_s"].items()), file=sys.stderr,
            flush=True)

    rows = compare(args.vllm_python, args.formats, args.streams, args.tokens, args.threads,
                   args.rounds, args.baseline, progress)
    print(table(best_rows(rows)))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0
