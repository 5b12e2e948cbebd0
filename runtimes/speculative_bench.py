"""`plt-port bench --speculative ngram|draft`: speculative decoding against plain CLP decoding
on an "edit this file" workload.

The workload: a Python file of up to 200 lines (the standard library's `_weakrefset.py`, a
file of the embedded models' held-out split), then a header asking for it back with one
change (class WeakSet renamed WeakRefSet), then the edited copy up to that change: the
model continues the copy, so every later line is in the prompt for prompt lookup to find.
Lines are dropped from the file's end until the prompt and the answer fit the model's
context.

Each (backend, loop count) runs the answer greedily, plain and speculative in turn
(`repeats` times each, alternating, so that a change of load on a shared machine hits both),
through the engine (`stream_generate`), from a prompt cache holding the prompt (each run
rewinds to it rather than prefilling again; plain runs keep the same undo journal). A row
reports both decode rates (the median run's tokens after the first per second), their ratio,
whether the outputs are identical, the drafts accepted, tokens per verify, and the costs
behind them: a plain decode step and a verify of K+1 rows, timed in turn on the same state
(`verify / step`, the tokens per verify at which speculation breaks even).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from plt_port.data import stdlib_dir

from .benchmark import BenchError, aligned_table
from .generate import stream_generate
from .prompt_cache import PromptCache, shared_prefix
from .sampling import SamplingParams
from .speculative import Speculation

EDIT_FILE = "_weakrefset.py"
EDIT_LINES = 200
OLD, NEW = "class WeakSet:", "class WeakRefSet:"
COST_ROUNDS = 8


def edit_prompt(tokenizer, new_tokens: int, max_positions: int) -> tuple[list[int], int]:
    """(prompt ids, lines of the file it holds): the file, the header, the copy up to the
    change, as many of the file's first EDIT_LINES lines as fit with `new_tokens` more."""
    with open(os.path.join(stdlib_dir(), EDIT_FILE), encoding="utf-8") as f:
        lines = f.read().splitlines()[:EDIT_LINES]
    while True:
        source = "\n".join(lines) + "\n"
        edited = source.replace(OLD, NEW, 1)
        copied = edited[:edited.index(NEW) + len(NEW)]
        text = (f"# {EDIT_FILE}\n{source}\n\n# {EDIT_FILE} again, with {OLD[6:-1]} renamed "
                f"{NEW[6:-1]}:\n{copied}")
        ids = tokenizer.encode(text, add_bos=tokenizer.add_bos_token)
        if len(ids) + new_tokens <= max_positions:
            return ids, len(lines)
        fitting = len(lines) * (max_positions - new_tokens) // len(ids)  # about as many
        if fitting <= copied.count("\n") + 1:
            raise BenchError(f"--speculative: the edit-this-file workload does not fit a "
                             f"context of {max_positions} positions with {new_tokens} new "
                             f"tokens")
        lines = lines[:min(fitting, len(lines) - 1)]


def run_answer(backend, tokenizer, ids, new_tokens, cache, speculation):
    """(tokens, decode tok/s, speculative stats) of one greedy answer."""
    tokens, last = [], None
    for last in stream_generate(backend, tokenizer, ids, max_new_tokens=new_tokens,
                                sampling=SamplingParams(), prompt_cache=cache,
                                speculation=speculation):
        tokens.append(last.token)
    return tokens, last.generation_tps, last.speculative


def step_and_verify_ms(backend, cache, ids, drafts: int) -> tuple[float, float]:
    """Median ms of a plain decode step and of a verify of `drafts` + 1 rows (then rewound),
    timed in turn from the prompt's state."""
    state, logits, _ = cache.start(backend, ids, len(ids) + drafts + 2)
    start = int(state.lengths[0])
    token = int(logits[0].argmax())
    rows = [token] * (drafts + 1)
    step_s, verify_s = [], []
    for _ in range(COST_ROUNDS):
        began = time.perf_counter()
        backend.step(state, np.array([token]))
        step_s.append(time.perf_counter() - began)
        backend.rewind(state, 0, start)
        began = time.perf_counter()
        backend.verify(state, rows)
        verify_s.append(time.perf_counter() - began)
        backend.rewind(state, 0, start)
    return statistics.median(step_s) * 1e3, statistics.median(verify_s) * 1e3


def time_speculative(backend, tokenizer, config, new_tokens: int, repeats: int,
                     load_draft=None) -> dict:
    """One row (module docstring) for `backend` under speculative `config`."""
    ids, lines = edit_prompt(tokenizer, new_tokens, backend.config.max_position_embeddings)
    cache = PromptCache(max_entries=4)
    run_answer(backend, tokenizer, ids, new_tokens, cache, None)  # warm-up, fills the cache
    runs = {"plain": [], "speculative": []}
    for _ in range(repeats):
        for kind in runs:
            speculation = Speculation(config, load_draft) if kind == "speculative" else None
            runs[kind].append(run_answer(backend, tokenizer, ids, new_tokens, cache,
                                         speculation))
    step_ms, verify_ms = step_and_verify_ms(backend, cache, ids, config.num_tokens)
    plain_tps = statistics.median(r[1] for r in runs["plain"])
    spec_tps = statistics.median(r[1] for r in runs["speculative"])
    stats = runs["speculative"][0][2]
    # every timed run starts alike (rewound to the prompt, its last token fed again): their
    # first tokens agree bit for bit, where a cold prefill's may not below fp32
    plain = runs["plain"][0][0]
    answers = [r[0] for kind in runs for r in runs[kind]]
    return dict(
        backend=backend.name, loops=backend.loops, method=config.method,
        num_tokens=config.num_tokens, ngram_size=config.ngram_size,
        prompt_tokens=len(ids), file_lines=lines, new_tokens=new_tokens,
        identical=all(answer == plain for answer in answers),
        first_difference=min((shared_prefix(answer, plain) for answer in answers
                              if answer != plain), default=None),
        plain_tps=plain_tps, speculative_tps=spec_tps, speedup=spec_tps / plain_tps,
        step_ms=step_ms, verify_ms=verify_ms, verify_per_step=verify_ms / step_ms,
        **stats.as_dict())


def format_speculative_table(title: str, rows: list[dict]) -> str:
    header = ["backend", "loops", "K", "plain tok/s", "spec tok/s", "speedup", "identical",
              "accepted", "tokens/verify", "step ms", "verify ms", "verify/step"]
    table = [header] + [[
        r["backend"], str(r["loops"]), str(r["num_tokens"]), f"{r['plain_tps']:.1f}",
        f"{r['speculative_tps']:.1f}", f"{r['speedup']:.2f}x",
        "yes" if r["identical"] else f"from token {r['first_difference']}",
        f"{r['accepted_tokens']}/{r['drafted_tokens']} ({r['acceptance_rate']:.0%})",
        f"{r['tokens_per_verify']:.2f}", f"{r['step_ms']:.2f}", f"{r['verify_ms']:.2f}",
        f"{r['verify_per_step']:.2f}"] for r in rows]
    return "\n".join([title, *aligned_table(table)])
