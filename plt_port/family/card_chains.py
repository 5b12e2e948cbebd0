"""MODEL_CARD_CHAINS.md, chains_accuracy.json and chains_examples.json of the chains family,
from the training run and the rows of

    plt-port eval --task chains --family --loops 1 2 3 4 --json EVAL_JSON

(`plt-port card --family chains` writes all three; the examples' answers are generated there
by a backend). Every figure in the card is read from those files; none is typed in.
"""

from __future__ import annotations

import json
import os

from . import CHAINS_FAMILY, FAMILY_DIR, family_model_dirs
from .. import tasks
from ..errors import PLTError
from ..evaluate import chain_markdown_table
from ..train import TOKENIZER_PROGRAMS
from .card import fmt_row, trainer_states, training_section

RUN_DIR = "runs/chains-family"
RECIPE_COMMAND = (f"plt-port train --out {RUN_DIR} --corpus chains --loops 1 2 3 4 --threads 1 "
                  "--ship-dir plt_port/family")
EXAMPLE_PAIRS = ((1, 2), (2, 3), (2, 4))  # (fewer, more) trained loops an example contrasts
EXAMPLES_PER_PAIR = 2


def load_rows(eval_json: str) -> list[dict]:
    try:
        with open(eval_json, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise PLTError(f"{eval_json}: no chain accuracy rows; run `plt-port eval --task chains "
                       f"--family --loops 1 2 3 4 --json {eval_json}` first") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "depth" in r for r in rows):
        raise PLTError(f"{eval_json}: not the rows of `plt-port eval --task chains`")
    return rows


def trained_rows(rows: list[dict]) -> dict[int, dict[int, dict]]:
    """{trained loops: {depth: row}} of each family model at its trained loop count."""
    found: dict[int, dict[int, dict]] = {}
    for r in rows:
        if r["model"] in CHAINS_FAMILY and r["loops"] == r["trained_loops"]:
            found.setdefault(r["loops"], {})[r["depth"]] = r
    return found


def separated_depths(rows: list[dict], fewer: int, more: int) -> list[int]:
    """Depths where the model trained with `more` loops beats the one with `fewer` by more
    than two standard errors of the difference, largest gap first."""
    by_loops = trained_rows(rows)
    if fewer not in by_loops or more not in by_loops:
        return []
    gaps = []
    for depth, low in by_loops[fewer].items():
        high = by_loops[more].get(depth)
        if high:
            gap = high["accuracy"] - low["accuracy"]
            if gap > 2 * (low["stderr"] ** 2 + high["stderr"] ** 2) ** 0.5:
                gaps.append((gap, depth))
    return [depth for _, depth in sorted(gaps, reverse=True)]


def pick_examples(rows: list[dict], answer, programs_per_depth: int) -> list[dict]:
    """Held-out programs (the eval's own) where the model trained with fewer loops answers
    wrong and the one with more loops right, at depths where the two measurably differ.
    `answer(model name, loops, prompt) -> str` is a model's greedy answer."""
    examples = []
    for fewer, more in EXAMPLE_PAIRS:
        low, high = f"plt-chains-L{fewer}", f"plt-chains-L{more}"
        found = 0
        for depth in separated_depths(rows, fewer, more):
            for program in tasks.programs("validation", f"eval/0/{depth}", programs_per_depth,
                                          [depth]):
                answers = {low: answer(low, fewer, program.prompt),
                           high: answer(high, more, program.prompt)}
                if answers[low] != program.answer and answers[high] == program.answer:
                    examples.append({"prompt": program.prompt, "answer": program.answer,
                                     "depth": depth, "columns": [[low, fewer], [high, more]],
                                     "answers": answers})
                    found += 1
                    break
            if found == EXAMPLES_PER_PAIR:
                break
    return examples


def examples_section(examples: list[dict]) -> list[str]:
    lines = ["## Examples", "",
             "Picked from the held-out programs of the eval (`pick_examples`): the model trained "
             "with fewer loops answers wrong, the one with more loops right; greedy answers on "
             "the torch runtime. The demo offers them as one-click examples.", ""]
    for e in examples:
        said = ", ".join(f"{model} (L={loops}): {e['answers'][model]!r}"
                         for model, loops in e["columns"])
        lines += [f"Depth {e['depth']}, answer {e['answer']}: {said}", "", "```python",
                  e["prompt"], "```", ""]
    return lines


def build_card(run_dir: str, rows: list[dict], examples: list[dict]) -> str:
    states = trainer_states(run_dir, CHAINS_FAMILY)
    if not states:
        raise PLTError(f"{run_dir}: no trainer_state.json of any chains model")
    recipe = next(iter(states.values()))["recipe"]
    with open(os.path.join(FAMILY_DIR, "plt-chains-L2", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    recipe_args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()
                           if k not in ("loops", "corpus", "max_corpus_bytes"))
    weights = sum(os.path.getsize(os.path.join(path, "model.safetensors"))
                  for path in family_model_dirs("chains").values())
    total_s = sum(s["train_seconds"] for s in states.values())
    programs = rows[0]["count"] if rows else "?"
    lines = [
        "# plt-chains: a PLT family where the loop count matters (loops 1, 2, 3, 4)", "",
        "Four tiny Parallel Loop Transformers trained from scratch by `plt-port train` on "
        "variable-chain programs (`plt_port/tasks.py`) with the same data, tokenizer, width, "
        "depth, steps and seed; they differ only in the loop count used in training, and "
        f"have the same {states[next(iter(states))]['parameters']:,} parameters. The task "
        "needs serial steps: each link's value needs the value of the link before it, "
        "never shown in the program, so a shallow stack cannot answer deep chains in one "
        f"pass. Weights: fp16 safetensors, {weights / 1e6:.2f} MB together.",
        "",
        "## Task", "",
        "```python", tasks.programs("validation", "card", 1, [3])[0].text.rstrip(), "```", "",
        "Depth = dependent assignments (links) from the chain's root to the printed "
        "variable; as many distractor assignments of digits to other variables are scattered "
        f"in between. Links add {', '.join(map(str, tasks.STEPS))}; the printed value is taken "
        "`% 10`, so answers are one digit. Train and validation are disjoint by a hash of the "
        "program text (`tasks.split_of`).", "",
        "## Recipe", "",
        "```", f"{RECIPE_COMMAND} \\", f"    {recipe_args}", "```", "",
        "(The shipped run trained the models as two processes side by side, `--loops 2 3` and "
        "`--loops 1 4`; each model depends only on its own recipe, and a rerun resumes from "
        f"the checkpoints in `{RUN_DIR}`.)", "",
        "Loss: cross-entropy on the answer and, at each assignment's newline, on the value "
        "that assignment computes (deep supervision: the value never appears in the input, so "
        "the model still has to carry it through the chain). Everything else in a program is "
        "random by construction. Pilots that scored the answer alone stayed at chance, and so "
        "did pilots whose links added any digit 1..9 (the full addition table modulo 10 is a "
        "slow-to-learn problem of its own). "
        f"Tokenizer: sentencepiece, {recipe['vocab_size']} pieces (single characters: every "
        "variable name is one and the same token wherever it appears), trained on "
        f"{TOKENIZER_PROGRAMS:,} generated train programs. Window: the "
        "local branch of loops >= 2 sees the whole program "
        f"(`--window-left {recipe['window_left']}`, context {recipe['seq_len']}).", "",
        fmt_row(["hidden", "layers", "heads / KV heads", "FFN", "vocab", "carry scale b"]),
        fmt_row(["---"] * 6),
        fmt_row([config["hidden_size"], config["num_hidden_layers"],
                 f"{config['num_attention_heads']} / {config['num_key_value_heads']}",
                 config["intermediate_size"], config["vocab_size"],
                 config.get("plt_hidden_scale") or 1.0]), "",
        *training_section(states), "",
        f"Wall-clock seconds of the training steps, {total_s / 60:.1f} minutes for the "
        "family, on one CPU thread of a shared 2-core machine (other jobs ran beside it).", "",
        "## Accuracy by depth", "",
        f"Exact match of the greedy answer after `# ->` on {programs} held-out programs per "
        "depth (`plt-port eval --task chains --family --loops 1 2 3 4`); cells: accuracy "
        "in % ± one binomial standard error; chance is 10%. Rows: trained loops, then the "
        "loop count at inference.", "",
        chain_markdown_table(rows), "",
        "The loop-count study (`docs/study/README.md`) plots these and tests each difference "
        "against two standard errors.", "",
        *examples_section(examples),
        "_Generated by `plt-port card --family chains`._", "",
    ]
    return "\n".join(lines)
