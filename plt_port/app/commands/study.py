"""plt-port study [--out DIR]: eval + loop diagnostics over the model family, as a markdown report.

Writes <out>/README.md, <out>/study.json and <out>/figures/ (see plt_port/study.py), into
./study unless --out names another folder (the repository's docs/study only when asked).
`--from-json` re-renders the report from a study.json without running the models.
"""

from __future__ import annotations

import os

from plt_port.app.commands.eval import add_chain_options

def add_arguments(parser):
    parser.add_argument("--out", default="study",
                        help="report folder (default ./study; written atomically); the "
                             "repository's report is regenerated with --out docs/study")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="study these models instead of the packaged family (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="held-out tokens for the diagnostics (default 16384: the eval's "
                             "windows, so the loss comparisons can be paired per window)")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="held-out tokens per eval (default 16384)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the numbers in <out>/study.json of models whose weights and "
                             "settings have not changed")
    parser.add_argument("--chains-model", action="append", default=[], metavar="NAME=DIR",
                        help="variable-chain models for the task-accuracy section (repeatable; "
                             "default without --model: the packaged chains family, when present)")
    add_chain_options(parser, "--chains-")
    parser.add_argument("--from-json", metavar="STUDY_JSON",
                        help="only re-render the report from an existing study.json")


def run(args):
    from plt_port.study import (FIGURE_DIR, compare_with_loopcoder, family_from_args, load_study,
                                run_study, write_study)  # torch

    if args.from_json:
        study = load_study(args.from_json)
    else:
        previous_path = os.path.join(args.out, "study.json")
        previous = load_study(previous_path) if args.reuse and os.path.exists(previous_path) \
            else None
        study = run_study(family_from_args(args.model), max_tokens=args.max_tokens,
                          eval_tokens=args.eval_tokens, seq_len=args.seq_len, previous=previous,
                          chains_family=chains_family(args),
                          chains_depths=args.chains_depths, chains_programs=args.chains_programs)
    write_study(study, args.out)
    for item in compare_with_loopcoder(study):
        print(f"{item['verdict']:>14}: {item['claim']}")
    print(f"wrote {os.path.join(args.out, 'README.md')}, study.json and {FIGURE_DIR}/")
    return 0


def chains_family(args) -> dict[str, str]:
    """The models of the chains section: --chains-model, else the packaged family unless
    --model chose other models than the packaged ones."""
    from plt_port.study import family_from_args

    if args.chains_model or not args.model:
        return family_from_args(args.chains_model, "chains")
    return {}
