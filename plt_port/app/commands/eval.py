"""plt-port eval [--model DIR | --family] [--loops N ...] [--baseline]
plt-port eval --task chains [--model DIR | --family] [--loops N ...] [--depths D ...]

Prints a markdown table of held-out loss, perplexity and next-token accuracy for every
(model, inference loop count) pair; with `--task chains`, the exact-match accuracy of the
variable-chain task (plt_port.tasks) by depth, with binomial standard errors. `--json PATH`
also writes the rows.
"""

from __future__ import annotations

import json
import os

from plt_port import family
from plt_port.atomic import atomic_write_text
from plt_port.app.cli import model_path, positive_int, thread_count
from plt_port.app.commands.generate import DTYPE_HELP, DTYPES
from plt_port.errors import PLTError
from plt_port.tasks import CHAINS_EVAL_DEPTHS, CHAINS_EVAL_PROGRAMS


def add_arguments(parser):
    parser.add_argument("-m", "--model", action="append", metavar="DIR|NAME", type=model_path,
                        help="model directory or shipped model name (repeatable; default: the "
                             "embedded loops=2 model)")
    parser.add_argument("--family", action="store_true",
                        help="evaluate every embedded model of the task's family "
                             "(plt-stdlib-L1..L4, or plt-chains-L1..L4 with --task chains)")
    parser.add_argument("--task", choices=["lm", "chains"], default="lm",
                        help="lm: held-out language modelling (default); chains: accuracy on "
                             "variable-chain programs by depth")
    add_chain_options(parser, "--")
    parser.add_argument("--loops", type=int, nargs="+",
                        help="inference loop counts (default: each model's trained count)")
    parser.add_argument("--baseline", action="store_true",
                        help="add a unigram baseline row (token frequencies of the train split)")
    parser.add_argument("--max-tokens", type=int, default=65536,
                        help="predicted tokens to score, 0 = the whole held-out split "
                             "(default: 65536)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=thread_count, help="torch CPU threads")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def add_chain_options(parser, prefix: str) -> None:
    """--depths and --programs of the chains accuracy (`prefix` "--" or "--chains-")."""
    parser.add_argument(f"{prefix}depths", type=positive_int, nargs="+",
                        default=list(CHAINS_EVAL_DEPTHS),
                        help="variable chains: the depths scored (default: "
                             f"{' '.join(map(str, CHAINS_EVAL_DEPTHS))})")
    parser.add_argument(f"{prefix}programs", type=positive_int, default=CHAINS_EVAL_PROGRAMS,
                        help="variable chains: held-out programs per depth (default: "
                             f"{CHAINS_EVAL_PROGRAMS})")


def run(args):
    import torch

    from plt_port.evaluate import chain_markdown_table, markdown_table

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_tokens < 0:
        raise PLTError(f"--max-tokens: must be >= 0, got {args.max_tokens}")
    max_tokens = args.max_tokens or None
    model_dirs = chosen_models(args)
    if args.task == "chains":
        rows = chain_rows(model_dirs, args)
        print(chain_markdown_table(rows))
    else:
        rows = lm_rows(model_dirs, args, max_tokens)
        print(markdown_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))


def chosen_models(args) -> dict[str, str]:
    """{display name: dir}: --model, the family of the task with --family, else the default."""
    corpus = "chains" if args.task == "chains" else "stdlib"
    model_dirs = family.display_names(args.model or [])
    if args.family:
        model_dirs.update(family.family_model_dirs(corpus))
        if not model_dirs:
            family.model_dir(family.FAMILIES[corpus][1])  # raises with the recipe to train it
    if not model_dirs:
        name = family.DEFAULT_MODEL if corpus == "stdlib" else family.CHAINS_FAMILY[1]
        model_dirs = {name: family.model_dir(name)}
    for path in model_dirs.values():
        if not os.path.isdir(path):
            raise PLTError(f"--model: {path} is not a directory")
    return model_dirs


def chain_rows(model_dirs: dict[str, str], args) -> list[dict]:
    from tqdm import tqdm

    from plt_port.config import PLTConfig
    from plt_port.evaluate import chain_accuracy

    rows = []
    jobs = [(name, path, loops) for name, path in model_dirs.items()
            for loops in (args.loops or [None])]
    for name, path, loops in tqdm(jobs, desc="eval", disable=len(jobs) < 2):
        trained = PLTConfig.from_file(path).num_loops
        for row in chain_accuracy(path, args.depths, args.programs, loops,
                                  batch_size=args.batch_size):
            rows.append({"model": name, "trained_loops": trained, "loops": loops or trained,
                         **row})
    return rows


def lm_rows(model_dirs: dict[str, str], args, max_tokens: int | None) -> list[dict]:
    from tqdm import tqdm

    from plt_port.evaluate import evaluate, unigram_baseline

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
    return rows
