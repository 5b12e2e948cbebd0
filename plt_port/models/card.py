"""Writes MODEL_CARD.md from the training run and the JSON rows of `plt-port eval`.

    python -m plt_port.models.card --run runs/stdlib-family --eval-dir runs/stdlib-family/eval

Every figure in the card is read from those files (or computed here from the corpus);
none is typed in by hand. The eval rows come from, per model NAME:

    plt-port eval --model plt_port/models/NAME --loops 1 2 3 4 [--baseline] \
        --json EVAL_DIR/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from . import FAMILY, MODEL_CARD, MODELS_DIR
from .. import data
from ..checkpoint import atomic_write_text

RECIPE_COMMAND = ("plt-port train --out runs/stdlib-family --loops 2 1 3 4 --threads 1 "
                  "--ship-dir plt_port/models")


def load_rows(eval_dir: str) -> list[dict]:
    rows = []
    for name in FAMILY:
        path = os.path.join(eval_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)
    return rows


def trainer_states(run_dir: str) -> dict[str, dict]:
    states = {}
    for name in FAMILY:
        path = os.path.join(run_dir, name, "checkpoint", "trainer_state.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                states[name] = json.load(f)
    return states


def fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def results_section(rows: list[dict]) -> list[str]:
    model_rows = [r for r in rows if r["model"] in FAMILY]
    baseline = next((r for r in rows if r["model"] == "unigram baseline"), None)
    trained = [r for r in model_rows if r["loops"] == int(r["model"][-1])]
    lines = ["## Held-out results", "",
             f"Validation split, {trained[0]['tokens'] if trained else '?'} predicted tokens in "
             "windows of 256 (`plt-port eval`), each model at its trained loop count:", "",
             fmt_row(["model", "loops", "loss (nats/token)", "perplexity", "next-token accuracy"]),
             fmt_row(["---"] * 5)]
    for r in trained + ([baseline] if baseline else []):
        lines.append(fmt_row([r["model"], r["loops"], f"{r['loss']:.4f}",
                              f"{r['perplexity']:.2f}", f"{100 * r['accuracy']:.2f}%"]))
    loop_counts = sorted({r["loops"] for r in model_rows})
    lines += ["", "Held-out loss across inference loop counts (rows: trained loops; columns: "
              "loops at inference; any count runs with any checkpoint):", "",
              fmt_row(["model"] + [f"L={n}" for n in loop_counts]),
              fmt_row(["---"] * (len(loop_counts) + 1))]
    for name in FAMILY:
        by_loops = {r["loops"]: r for r in model_rows if r["model"] == name}
        if by_loops:
            lines.append(fmt_row([name] + [f"{by_loops[n]['loss']:.4f}" if n in by_loops else "-"
                                           for n in loop_counts]))
    return lines


def training_section(states: dict[str, dict]) -> list[str]:
    lines = ["## Training", "",
             fmt_row(["model", "parameters", "steps", "tokens seen", "train time (s)",
                      "final train loss (mean of last 20 steps)"]), fmt_row(["---"] * 6)]
    for name, state in states.items():
        lines.append(fmt_row([name, f"{state['parameters']:,}",
                              f"{state['step']}/{state['recipe']['steps']}",
                              f"{state['tokens_seen']:,}", f"{state['train_seconds']:.0f}",
                              f"{np.mean(state['train_loss'][-20:]):.4f}"]))
    return lines


SAMPLE_PROMPT = "import os\n\n\ndef read_lines(path):\n    "
SAMPLE_TOKENS = 64


def samples_section() -> list[str]:
    """One sampled continuation per model (torch runtime, temperature 0.6, top-k 40, seed 0)."""
    from runtimes import load_backend
    from runtimes.generate import generate
    from runtimes.sampling import SamplingParams

    from ..tokenizer import Tokenizer

    lines = ["## Samples", "", f"Prompt `{SAMPLE_PROMPT!r}`, {SAMPLE_TOKENS} new tokens, "
             "sampled with temperature 0.6, top-k 40, seed 0 on the torch runtime (CLP decode):", ""]
    for name in FAMILY:
        path = os.path.join(MODELS_DIR, name)
        if not os.path.exists(os.path.join(path, "config.json")):
            continue
        text, _ = generate(load_backend("torch", path), Tokenizer.from_dir(path), SAMPLE_PROMPT,
                           max_new_tokens=SAMPLE_TOKENS, add_bos=False,
                           sampling=SamplingParams(temperature=0.6, top_k=40, seed=0))
        lines += [f"**{name}**", "", "```python", SAMPLE_PROMPT + text, "```", ""]
    return lines


def build_card(run_dir: str, eval_dir: str) -> str:
    states = trainer_states(run_dir)
    if not states:
        raise SystemExit(f"{run_dir}: no trainer_state.json of any family model")
    recipe = next(iter(states.values()))["recipe"]
    config = json.load(open(os.path.join(MODELS_DIR, "plt-stdlib-L2", "config.json")))
    train_files, val_files = (data.corpus_files(s, max_total_bytes=recipe["max_corpus_bytes"])
                              for s in ("train", "validation"))
    n_tokens = {s: len(np.load(os.path.join(run_dir, f"tokens-{s}.npy"), allow_pickle=False))
                for s in ("train", "validation")}
    recipe_args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items() if k != "loops")
    lines = [
        "# plt-stdlib: the embedded PLT model family (loops 1, 2, 3, 4)", "",
        "Four small Parallel Loop Transformer code models in the `iquestpltcoder` layout "
        "(SPEC section 5), trained from scratch by `plt-port train` with the same data, "
        "tokenizer, width, depth, steps and seed; they differ only in the loop count used in "
        "training. `plt-stdlib-L2` (two loops, like LoopCoder-v2) is the default model of the "
        "CLI, the demo and the tests. Weights are fp16 safetensors. They are tiny models for "
        "demonstrating and testing the PLT runtimes: they write Python-looking code, not "
        "correct programs.", "",
        "## Recipe", "",
        "```", RECIPE_COMMAND, "```", "",
        "with the defaults of `plt_port.train.Recipe`, i.e. explicitly:", "",
        "```", f"{RECIPE_COMMAND} \\", f"    {recipe_args}", "```", "",
        "Re-running the command resumes from the last checkpoint in `runs/stdlib-family`; "
        "from an empty directory it retrains the models (fp32 on CPU, one thread; the same "
        "interpreter and torch build give the same weights: a rerun of the L1 recipe from "
        "scratch matched the shipped run bit for bit, though MKL's default mode may change "
        "the last bits between processes, see `MKL_CBWR`). Optimizer: AdamW (betas 0.9, "
        "0.95; weight decay on matrices only), linear warmup then cosine decay, gradient "
        "clipping. Loss: cross-entropy of the last loop's logits.", "",
        "## Data", "",
        f"The Python standard library sources of the interpreter that ran the recipe "
        f"({platform.python_implementation()} {platform.python_version()}), `.py` files "
        "only, tests and site-packages excluded, deduplicated by content, files over "
        f"{data.MAX_FILE_BYTES:,} bytes skipped, corpus capped at "
        f"{recipe['max_corpus_bytes']:,} bytes; split by a hash of each file's path "
        f"({data.VALIDATION_PERCENT}% validation). Train: {len(train_files)} files, "
        f"{n_tokens['train']:,} tokens; validation: {len(val_files)} files, "
        f"{n_tokens['validation']:,} tokens. Nothing is downloaded. "
        "(`plt_port.data.corpus_files`, `held_out_text`.)", "",
        f"Tokenizer: sentencepiece BPE, {recipe['vocab_size']} pieces, trained on the train "
        "split with code-faithful settings (identity normalisation, whitespace kept, byte "
        "fallback): text round-trips exactly. Documents are joined by `</s>`; training "
        "used no `<s>` (tokenizer_config `add_bos_token: false`).", "",
        "## Architecture", "",
        fmt_row(["hidden", "layers", "heads / KV heads", "head dim", "FFN", "vocab",
                 "window (keys incl. query)", "gate", "carry scale b", "context (trained)"]),
        fmt_row(["---"] * 10),
        fmt_row([config["hidden_size"], config["num_hidden_layers"],
                 f"{config['num_attention_heads']} / {config['num_key_value_heads']}",
                 config["head_dim"], config["intermediate_size"], config["vocab_size"],
                 f"{config['plt_window_size']} ({config['plt_window_size'][0] + 1})",
                 "hidden-state form (`plt_gate_use_hidden_states: true`)",
                 config.get("plt_hidden_scale") or 1.0, recipe["seq_len"]]),
        "",
        "Loop r >= 2 reads u = E + b n(h^(r-1)) shifted by one token (SPEC section 2). With "
        "Llama-style init the embeddings are small (std 0.02) while n(h) = FinalNorm(h) has "
        "RMS about 1, so with b = 1 the carried state swamps the token embedding and the "
        "looped models learn far slower than the one-loop model in short training; b is set "
        "near the embedding RMS instead (`--hidden-scale`).",
        "",
        *training_section(states), "",
        "Train times are wall-clock seconds of the training steps on one CPU thread of a "
        "shared 2-core machine (other jobs ran beside it).", "",
        *results_section(load_rows(eval_dir)), "",
        "The unigram baseline is add-one smoothed token frequencies of the train split, "
        "scored on the same targets (`plt_port.evaluate.unigram_baseline`).", "",
        "Reproduce the tables: `plt-port eval --family --loops 1 2 3 4 --baseline`.", "",
        *samples_section(),
        "_Generated by `python -m plt_port.models.card`._", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/stdlib-family")
    parser.add_argument("--eval-dir", default="runs/stdlib-family/eval")
    parser.add_argument("--out", default=MODEL_CARD)
    args = parser.parse_args(argv)
    text = build_card(args.run, args.eval_dir)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
