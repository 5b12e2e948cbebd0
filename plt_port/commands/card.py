"""plt-port card: the family's MODEL_CARD.md and heldout.json from a training run and eval rows.

    plt-port card --run runs/stdlib-family --eval-dir runs/stdlib-family/eval

The card's samples are generated here on the torch backend; everything else comes from the
run's trainer states and the eval rows (see plt_port/family/card.py for the eval commands).
`--heldout-only` writes only heldout.json, from the eval rows alone.
"""

from __future__ import annotations

import json

from plt_port.atomic import atomic_write_text
from plt_port.family import HELDOUT_JSON, MODEL_CARD, card, family_model_dirs
from plt_port.tokenizer import Tokenizer
from runtimes import load_backend
from runtimes.generate import generate
from runtimes.sampling import SamplingParams


def add_arguments(parser):
    parser.add_argument("--run", default="runs/stdlib-family", help="the training run folder")
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


def run(args):
    rows = card.load_rows(args.eval_dir)
    atomic_write_text(args.heldout_out, json.dumps(card.heldout(rows), indent=1) + "\n")
    print(f"wrote {args.heldout_out}")
    if args.heldout_only:
        return 0
    atomic_write_text(args.out, card.build_card(args.run, rows, samples()))
    print(f"wrote {args.out}")
    return 0
