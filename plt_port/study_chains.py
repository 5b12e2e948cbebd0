"""The variable-chain section of the loop-count study: task accuracy by depth and loop count.

Every model of the chains family is scored (`evaluate.chain_accuracy`, the same held-out
programs for all) at inference loop counts 1..MAX_INFERENCE_LOOPS; the report compares the
models at their trained loop count and the two-loop model run with more or fewer loops, and
words each comparison from the numbers: a difference counts only beyond two standard errors
of the difference (binomial, treated as independent samples, which is conservative here since
every run answers the same programs).
"""

from __future__ import annotations

import math

from .config import PLTConfig
from .evaluate import chain_accuracy

MAX_INFERENCE_LOOPS = 4
PROBE_LOOPS = 2
FIGURES = ("chains_accuracy_by_depth", "chains_inference_loops")


def run_chains(family: dict[str, str], depths, programs: int, digest_of,
               previous: dict | None = None, progress=print) -> dict:
    """{"depths", "programs", "models": {name: {dir, trained_loops, weights_sha256, rows}}};
    a model whose weights digest and settings match `previous` keeps its earlier rows."""
    depths = list(depths)
    earlier_models = (previous or {}).get("models", {}) \
        if previous and previous.get("depths") == depths and previous.get("programs") == programs \
        else {}
    models = {}
    for name, model_dir in family.items():
        digest = digest_of(model_dir)
        earlier = earlier_models.get(name, {})
        if earlier.get("weights_sha256") == digest:
            progress(f"{name}: weights unchanged, reusing the earlier chain accuracy")
            models[name] = {**earlier, "dir": model_dir}
            continue
        progress(f"{name}: chain accuracy at 1..{MAX_INFERENCE_LOOPS} loops")
        rows = [{"loops": loops, **row} for loops in range(1, MAX_INFERENCE_LOOPS + 1)
                for row in chain_accuracy(model_dir, depths, programs, loops)]
        models[name] = {"dir": model_dir, "trained_loops": PLTConfig.from_file(model_dir).num_loops,
                        "weights_sha256": digest, "rows": rows}
    return {"depths": depths, "programs": programs, "models": models}


def _by_loops(model: dict, loops: int) -> dict[int, dict]:
    return {r["depth"]: r for r in model["rows"] if r["loops"] == loops}


def trained_runs(section: dict) -> dict[int, tuple[str, dict[int, dict]]]:
    """{trained loops: (model name, {depth: row at its trained loop count})}."""
    return {m["trained_loops"]: (name, _by_loops(m, m["trained_loops"]))
            for name, m in sorted(section["models"].items(),
                                  key=lambda kv: kv[1]["trained_loops"])}


def probe(section: dict) -> tuple[str, dict] | None:
    return next(((name, m) for name, m in section["models"].items()
                 if m["trained_loops"] == PROBE_LOOPS), None)


def difference(a: dict, b: dict) -> tuple[float, float]:
    """Accuracy of a minus b, and two standard errors of that difference."""
    return a["accuracy"] - b["accuracy"], 2 * math.hypot(a["stderr"], b["stderr"])


def compare(runs: dict, label: str, reference_label: str, reference: dict[int, dict],
            depths: list[int]) -> dict:
    """Per depth: run minus reference beyond 2 SE up, down, or within noise."""
    better, worse, lines = [], [], []
    for depth in depths:
        delta, two_se = difference(runs[depth], reference[depth])
        if delta > two_se:
            better.append(depth)
        elif delta < -two_se:
            worse.append(depth)
        lines.append(f"depth {depth}: {100 * delta:+.1f} ± {100 * two_se:.1f} points")
    return {"label": label, "reference": reference_label, "better": better, "worse": worse,
            "lines": lines}


def comparisons(section: dict) -> list[dict]:
    """More loops than one help? Loops 3 and 4 regress against two? Trained and at inference."""
    depths, trained, found = section["depths"], trained_runs(section), []
    if 1 in trained:
        base_name, base = trained[1]
        for loops, (name, rows) in trained.items():
            if loops > 1:
                found.append(compare(rows, f"{name} (L={loops})", f"{base_name} (L=1)", base,
                                     depths))
    if PROBE_LOOPS in trained:
        ref_name, ref = trained[PROBE_LOOPS]
        for loops, (name, rows) in trained.items():
            if loops > PROBE_LOOPS:
                found.append(compare(rows, f"{name} (L={loops})", f"{ref_name} (L=2)", ref,
                                     depths))
    if probe(section):
        name, model = probe(section)
        ref = _by_loops(model, PROBE_LOOPS)
        for loops in range(1, MAX_INFERENCE_LOOPS + 1):
            if loops != PROBE_LOOPS:
                found.append(compare(_by_loops(model, loops), f"{name} run at L={loops}",
                                     f"{name} at its trained L=2", ref, depths))
    return found


def _sentence(item: dict) -> str:
    def listed(depths):
        return ", ".join(map(str, depths))

    parts = []
    if item["better"]:
        parts.append(f"more accurate at depth {listed(item['better'])}")
    if item["worse"]:
        parts.append(f"less accurate at depth {listed(item['worse'])}")
    verdict = "; ".join(parts) if parts else "no difference beyond 2 standard errors"
    return f"- {item['label']} vs {item['reference']}: **{verdict}**."


def _cell(row: dict) -> str:
    return f"{100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f}"


def report(section: dict) -> list[str]:
    depths = section["depths"]
    header = ["model", "trained loops", "inference loops"] + [f"depth {d}" for d in depths]
    lines = ["## Variable chains: task accuracy by depth", "",
             "The chains family (`plt_port/family/MODEL_CARD_CHAINS.md`) answers held-out "
             "variable-chain programs (`plt_port/tasks.py`): exact match of the greedy answer "
             f"after `# ->`, {section['programs']} programs per depth, the same programs for "
             "every model and loop count. Cells: accuracy in % ± one binomial standard error "
             "(chance: 10%).", "",
             "Each model at the loop count it was trained with:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for loops, (name, rows) in trained_runs(section).items():
        lines.append(f"| {name} | {loops} | {loops} | "
                     + " | ".join(_cell(rows[d]) for d in depths) + " |")
    lines += ["", f"![accuracy by depth](figures/{FIGURES[0]}.png)", ""]
    if probe(section):
        name, model = probe(section)
        lines += [f"The {PROBE_LOOPS}-loop model `{name}` run at other inference loop counts:", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for loops in range(1, MAX_INFERENCE_LOOPS + 1):
            rows = _by_loops(model, loops)
            lines.append(f"| {name} | {PROBE_LOOPS} | {loops} | "
                         + " | ".join(_cell(rows[d]) for d in depths) + " |")
        lines += ["", f"![inference loops](figures/{FIGURES[1]}.png)", ""]
    lines += ["Differences, computed from the tables (a difference counts only beyond two "
              "standard errors of the difference):", ""]
    for item in comparisons(section):
        lines.append(_sentence(item))
        lines += [f"  - {line}" for line in item["lines"]]
    lines += ["", "Every model's rows at every inference loop count are in `study.json` "
              "(`chains.models.<name>.rows`).", ""]
    return lines


def figures(section: dict) -> list[tuple[str, object]]:
    """Accuracy vs depth with ±1 standard error bars: one line per trained loop count, and
    one per inference loop count of the two-loop model."""
    from matplotlib.figure import Figure

    def plot(stem, title, curves):
        fig = Figure(figsize=(5.2, 3.4), layout="constrained")
        ax = fig.subplots()
        for label, rows in curves:
            depths = sorted(rows)
            ax.errorbar(depths, [100 * rows[d]["accuracy"] for d in depths],
                        yerr=[100 * rows[d]["stderr"] for d in depths], marker="o",
                        capsize=3, label=label)
        ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(section["depths"])
        ax.set_ylim(0, 100)
        ax.set_xlabel("chain depth (dependent assignments)")
        ax.set_ylabel("exact-match accuracy [%]")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return stem, fig

    result = [plot(FIGURES[0], "trained with L loops, run at L",
                   [(f"L={loops} ({name})", rows)
                    for loops, (name, rows) in trained_runs(section).items()])]
    if probe(section):
        name, model = probe(section)
        result.append(plot(FIGURES[1], f"{name} run at L loops",
                           [(f"L={loops}", _by_loops(model, loops))
                            for loops in range(1, MAX_INFERENCE_LOOPS + 1)]))
    return result
