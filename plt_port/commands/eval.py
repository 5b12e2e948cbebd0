"""plt-port eval [--model DIR | --family] [--loops N ...] [--baseline]

Prints a markdown table of held-out loss, perplexity and next-token accuracy for every
(model, inference loop count) pair; `--json PATH` also writes the rows.
"""

from __future__ import annotations

import json
import os

from plt_port import family
from plt_port.atomic import atomic_write_text
from plt_port.cli import positive_int
from plt_port.commands.generate import DTYPE_HELP, DTYPES


def add_arguments(parser):
    parser.add_argument("--model", action="append", metavar="DIR",
                        help="model directory (repeatable; default: the embedded loops=2 model)")
    parser.add_argument("--family", action="store_true",
                        help="evaluate every embedded family model (plt-stdlib-L1..L4)")
    parser.add_argument("--loops", type=int, nargs="+",
                        help="inference loop counts (default: each model's trained count)")
    parser.add_argument("--baseline", action="store_true",
                        help="add a unigram baseline row (token frequencies of the train split)")
    parser.add_argument("--max-tokens", type=int, default=65536,
                        help="predicted tokens to score, 0 = the whole held-out split "
                             "(default: 65536)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def run(args):
    import torch
    from tqdm import tqdm

    from plt_port.evaluate import EvalError, evaluate, markdown_table, unigram_baseline

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_tokens < 0:
        raise EvalError(f"--max-tokens: must be >= 0, got {args.max_tokens}")
    max_tokens = args.max_tokens or None
    model_dirs = family.display_names(args.model or [])
    if args.family:
        model_dirs.update(family.family_model_dirs())
        if not model_dirs:
            family.default_model_dir()  # raises with the recipe to train the family
    if not model_dirs:
        model_dirs = {family.DEFAULT_MODEL: family.default_model_dir()}
    for path in model_dirs.values():
        if not os.path.isdir(path):
            raise EvalError(f"--model: {path} is not a directory")

    jobs = [(name, path, loops) for name, path in model_dirs.items()
            for loops in (args.loops or [None])]
    rows = []
    for name, path, loops in tqdm(jobs, desc="eval", disable=len(jobs) < 2):
        result = evaluate(path, loops, max_tokens, args.batch_size, args.seq_len, args.dtype)
        rows.append({"model": name, **result})
    if args.baseline:
        tokenizer_dir = next(iter(model_dirs.values()))
        rows.append({"model": "unigram baseline", "loops": "-",
                     **unigram_baseline(tokenizer_dir, max_tokens, args.seq_len)})
    print(markdown_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
