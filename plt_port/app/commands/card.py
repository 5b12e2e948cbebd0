"""plt-port card: the family's MODEL_CARD.md and heldout.json from a training run and eval rows.

    plt-port card --run runs/stdlib-family --eval-dir runs/stdlib-family/eval
    plt-port card --family chains --run runs/chains-family --eval-json runs/chains-family/eval.json

The second writes MODEL_CARD_CHAINS.md, chains_accuracy.json (the eval rows) and
chains_examples.json (the demo's examples, picked by running the models).

The card's samples are generated here on the torch backend; everything else comes from the
run's trainer states and the eval rows (see plt_port/family/card.py for the eval commands).
`--heldout-only` writes only heldout.json, from the eval rows alone.
"""

from __future__ import annotations

import json

from plt_port.atomic import atomic_write_text
from plt_port.family import (CHAINS_ACCURACY_JSON, CHAINS_EXAMPLES_JSON, CHAINS_MODEL_CARD,
                             HELDOUT_JSON, MODEL_CARD, card, family_model_dirs)
from plt_port.tokenizer import Tokenizer
from runtimes.backends import load_backend
from runtimes.generate import generate
from runtimes.sampling import SamplingParams


def add_arguments(parser):
    parser.add_argument("--family", choices=["stdlib", "chains"], default="stdlib",
                        help="which family's card (default stdlib)")
    parser.add_argument("--run", help="the training run folder (default runs/FAMILY-family)")
    parser.add_argument("--eval-json", default="runs/chains-family/eval.json",
                        help="chains: the rows of `plt-port eval --task chains --family "
                             "--loops 1 2 3 4 --json PATH`")
    parser.add_argument("--eval-dir", default="runs/stdlib-family/eval",
                        help="folder of the eval rows, one NAME.json per family model")
    parser.add_argument("--out", default=MODEL_CARD, help="model card path")
    parser.add_argument("--heldout-out", default=HELDOUT_JSON, help="heldout.json path")
    parser.add_argument("--heldout-only", action="store_true",
                        help="write only heldout.json (no training run needed)")


def samples() -> dict[str, str]:
    """{model name: continuation of the card's sample prompt} for each family model present."""
    texts = {}
    for name, path in family_model_dirs().items():
        texts[name], _ = generate(load_backend("torch", path), Tokenizer.from_dir(path),
                                  card.SAMPLE_PROMPT, max_new_tokens=card.SAMPLE_TOKENS,
                                  add_bos=False, sampling=SamplingParams(**card.SAMPLING))
    return texts


def greedy_answers():
    """answer(model name, loops, prompt): the first word a chains family model writes after
    the prompt, greedily, on the torch runtime (each backend loaded once)."""
    dirs, backends = family_model_dirs("chains"), {}

    def answer(name: str, loops: int, prompt: str) -> str:
        if (name, loops) not in backends:
            backends[name, loops] = (load_backend("torch", dirs[name], loops=loops),
                                     Tokenizer.from_dir(dirs[name]))
        text, _ = generate(*backends[name, loops], prompt, max_new_tokens=4, add_bos=False,
                           sampling=SamplingParams(temperature=0.0))
        return (text.split() or [""])[0]

    return answer


def run_chains(args):
    from plt_port.family import card_chains

    rows = card_chains.load_rows(args.eval_json)
    examples = card_chains.pick_examples(rows, greedy_answers(), rows[0]["count"])
    atomic_write_text(CHAINS_ACCURACY_JSON, json.dumps(rows, indent=1) + "\n")
    atomic_write_text(CHAINS_EXAMPLES_JSON, json.dumps({"examples": examples}, indent=1) + "\n")
    atomic_write_text(CHAINS_MODEL_CARD, card_chains.build_card(
        args.run or card_chains.RUN_DIR, rows, examples))
    print(f"wrote {CHAINS_MODEL_CARD}, {CHAINS_ACCURACY_JSON} and {CHAINS_EXAMPLES_JSON} "
          f"({len(examples)} examples)")
    return 0


def run(args):
    if args.family == "chains":
        return run_chains(args)
    args.run = args.run or "runs/stdlib-family"
    rows = card.load_rows(args.eval_dir)
    atomic_write_text(args.heldout_out, json.dumps(card.heldout(rows), indent=1) + "\n")
    print(f"wrote {args.heldout_out}")
    if args.heldout_only:
        return 0
    atomic_write_text(args.out, card.build_card(args.run, rows, samples()))
    print(f"wrote {args.out}")
    return 0
