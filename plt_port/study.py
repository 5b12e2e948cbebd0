"""The loop-count study of a model family: eval + loop diagnostics, written as a markdown report.

Runs, on the held-out split:
- every family model at its trained loop count (held-out eval and diagnostics);
- the model trained with 2 loops at inference loop counts 1..4 (eval at each count; one
  diagnostics forward at 4 loops covers loops 1..4, since loop r never reads a later loop).
- when given the chains family, its task accuracy by depth at inference loop counts 1..4
  (`plt_port.study_chains`).
`write_study` writes <out>/README.md (tables and plots, all generated from <out>/study.json),
<out>/study.json and <out>/figures/*.png. The comparison with the published LoopCoder-v2
pattern is computed from the numbers: each claim is checked and worded by `compare_with_loopcoder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from . import checkpoint, diagnostics, study_chains
from .atomic import atomic_dir
from .config import PLTConfig
from .errors import PLTError
from .evaluate import evaluate
from .family import family_model_dirs
from .tasks import CHAINS_EVAL_PROGRAMS

PROBE_LOOPS = 2          # the family member run at inference loop counts 1..MAX_INFERENCE_LOOPS
MAX_INFERENCE_LOOPS = 4
FIGURE_DIR = "figures"
PER_LAYER_DIR = "per_layer"  # the probe's per-layer plots, under FIGURE_DIR


class StudyError(PLTError, ValueError):
    """A family or a study.json the study cannot use."""


# ---- running the models -------------------------------------------------------------------

def family_from_args(specs: list[str], corpus: str = "stdlib") -> dict[str, str]:
    """{name: dir} of NAME=DIR specs, or of the packaged family of `corpus` (may be empty for
    the chains family: the study then has no chains section)."""
    if not specs:
        # paths relative to the working directory when under it: study.json stays portable
        family = {name: os.path.relpath(d) if os.path.abspath(d).startswith(os.getcwd() + os.sep)
                  else d for name, d in family_model_dirs(corpus).items()}
        if not family and corpus == "stdlib":
            raise StudyError("the packaged model family is empty (train it first, or pass "
                             "--model NAME=DIR)")
        return family
    family = {}
    for spec in specs:
        name, sep, model_dir = spec.partition("=")
        if not sep or not name or not model_dir:
            raise StudyError(f"--model: expected NAME=DIR, got {spec!r}")
        family[name] = model_dir
    return family


def run_study(family: dict[str, str], max_tokens: int = 16384, eval_tokens: int | None = 16384,
              seq_len: int = 256, progress: bool = True, previous: dict | None = None,
              chains_family: dict[str, str] | None = None, chains_depths=(),
              chains_programs: int = CHAINS_EVAL_PROGRAMS) -> dict:
    """All numbers of the report, as one JSON-able dict.

    `previous`: an earlier study.json; a model whose weights and settings match its entry
    there is not run again (its numbers were made by this same code on the same weights).
    """
    configs = {name: PLTConfig.from_file(model_dir) for name, model_dir in family.items()}
    probes = [name for name, config in configs.items() if config.num_loops == PROBE_LOOPS]
    if not probes:
        raise StudyError(f"the family has no model trained with {PROBE_LOOPS} loops "
                         f"(trained loop counts: {sorted(c.num_loops for c in configs.values())})")
    probe = probes[0]
    previous_models = (previous or {}).get("models", {})

    models = {}
    for name, model_dir in family.items():
        config = configs[name]
        settings = {"loops": MAX_INFERENCE_LOOPS if name == probe else config.num_loops,
                    "diagnostic_tokens": max_tokens, "eval_tokens": eval_tokens,
                    "seq_len": seq_len}
        digest = weights_digest(model_dir)
        earlier = previous_models.get(name, {})
        if earlier.get("weights_sha256") == digest and earlier.get("settings") == settings:
            print(f"{name}: weights and settings unchanged, reusing the earlier numbers")
            models[name] = {**earlier, "dir": os.fspath(model_dir),
                            "diagnostics": {**earlier["diagnostics"], "model": os.fspath(model_dir)}}
            continue
        models[name] = {
            "dir": os.fspath(model_dir),
            "trained_loops": config.num_loops,
            "parameters": sum(_numel(s) for s in checkpoint.expected_shapes(config).values()),
            "weights_sha256": digest,
            "settings": settings,
            **_measure(model_dir, settings, name == probe, config.num_loops, progress),
        }
    study = {"probe": probe, "max_inference_loops": MAX_INFERENCE_LOOPS,
             "diagnostic_tokens": max_tokens, "eval_tokens": eval_tokens, "seq_len": seq_len,
             "command": "plt-port " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["study"]
             else "plt-port study",
             "models": models}
    if chains_family:
        study["chains"] = study_chains.run_chains(chains_family, chains_depths, chains_programs,
                                                  weights_digest, (previous or {}).get("chains"))
    return study


def _measure(model_dir: str, settings: dict, is_probe: bool, trained_loops: int,
             progress: bool) -> dict:
    """Held-out eval (at each loop count studied) and diagnostics of one model."""
    # the same windows as the diagnostics, so losses pair per window
    eval_options = {"seq_len": settings["seq_len"]}
    if settings["eval_tokens"] is not None:
        eval_options["max_tokens"] = settings["eval_tokens"]
    eval_loops = range(1, MAX_INFERENCE_LOOPS + 1) if is_probe else [trained_loops]
    return {
        "eval": {str(r): evaluate(model_dir, loops=r, **eval_options) for r in eval_loops},
        "diagnostics": diagnostics.diagnose(model_dir, settings["loops"],
                                            seq_len=settings["seq_len"],
                                            max_tokens=settings["diagnostic_tokens"],
                                            progress=progress),
    }


def weights_digest(model_dir: str) -> str:
    """sha256 of config.json and the weight files: what decides a model's numbers."""
    digest = hashlib.sha256()
    for path in [os.path.join(model_dir, "config.json"), *checkpoint.weight_files(os.fspath(model_dir))]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def trained_view(model: dict) -> dict:
    """The diagnostics of a model cut to its trained loop count (exact: loop r <= L does not
    depend on how many loops follow)."""
    diag, loops = model["diagnostics"], model["trained_loops"]
    return {**diag, "loops": loops,
            "per_loop": {k: v[:loops] for k, v in diag["per_loop"].items()},
            "per_layer": {k: v[:loops] for k, v in diag["per_layer"].items()},
            "loss_per_window": diag.get("loss_per_window", [])[:loops]}


# ---- the comparison with LoopCoder-v2, computed from the numbers ---------------------------

def _verdict(checks: list[bool]) -> str:
    if not checks:
        return "cannot tell (no run tests it)"
    if all(checks):
        return "agree"
    return "partly agree" if any(checks) else "differ"


def _values(values, first=1) -> str:
    return ", ".join(f"loop {r}: {v:.4g}" for r, v in enumerate(values, start=1)
                     if r >= first and v is not None)


def _runs(study: dict) -> list[tuple[str, dict]]:
    """(label, per-loop diagnostics) of every run: the probe at 1..4, each other model trained."""
    runs = []
    for name, model in study["models"].items():
        if name == study["probe"]:
            runs.append((f"{name} run at 1..{model['diagnostics']['loops']} loops",
                         model["diagnostics"]["per_loop"]))
        else:
            runs.append((f"{name} (trained with {model['trained_loops']})",
                         trained_view(model)["per_loop"]))
    return runs


def compare_with_loopcoder(study: dict) -> list[dict]:
    """One entry per published LoopCoder-v2 claim: claim, verdict, evidence (all from numbers)."""
    runs = _runs(study)
    findings = []

    def finding(claim, checks, evidence, note="", caveat=""):
        findings.append({"claim": claim, "verdict": _verdict(checks), "evidence": evidence,
                         "note": note, "caveat": caveat})

    # 1. effective rank peaks at loop 2
    checks, evidence = [], []
    for label, per_loop in runs:
        ranks = per_loop["effective_rank"]
        if len(ranks) >= 2:
            peak = max(range(len(ranks)), key=lambda i: ranks[i]) + 1
            checks.append(peak == 2)
            evidence.append(f"{label}: largest at loop {peak} ({_values(ranks)})")
    finding("Loop 2 has the largest effective rank", checks, evidence)

    # 2. output shift peaks at loop 2 (among loops >= 2; loop 1's shift is against the
    #    embeddings' logit lens, a different kind of step)
    checks, evidence = [], []
    for label, per_loop in runs:
        shifts = per_loop["kl_shift"]
        if len(shifts) >= 3:
            peak = max(range(1, len(shifts)), key=lambda i: shifts[i]) + 1
            checks.append(peak == 2)
            evidence.append(f"{label}: largest at loop {peak} ({_values(shifts, first=2)})")
    finding("Loop 2 has the largest output distribution shift (KL)", checks, evidence,
            "compared over loops >= 2; needs runs with 3 or more loops")

    # 3. later loops oscillate: negative update alignment at loops >= 3
    checks, evidence = [], []
    for label, per_loop in runs:
        later = [(r, v) for r, v in enumerate(per_loop["alignment"], start=1) if r >= 3]
        checks += [v < 0 for _, v in later]
        if later:
            evidence.append(f"{label}: " + ", ".join(f"loop {r}: {v:+.3f}" for r, v in later))
    finding("Later loops oscillate (negative update alignment at loops >= 3)", checks, evidence)

    # 4. the gate keeps the global branch above half
    checks, evidence = [], []
    for label, per_loop in runs:
        gates = per_loop["gate_mean"][1:]
        checks += [g > 0.5 for g in gates]
        if gates:
            evidence.append(f"{label}: {_values(per_loop['gate_mean'], first=2)}")
    finding("Gate mean stays above 0.5 (global branch dominates)", checks, evidence,
            "per loop, mean over layers")

    # 5. loops 3 and 4 regress: at inference (the 2-loop model run with more loops) ...
    probe_name = study["probe"]
    probe = study["models"][probe_name]
    losses = {int(r): e["loss"] for r, e in probe["eval"].items()}
    later = [r for r in sorted(losses) if r > PROBE_LOOPS]
    noise = [_paired_noise(study, (probe_name, r), (probe_name, PROBE_LOOPS)) for r in later]
    finding(f"Loops 3 and 4 regress: the {PROBE_LOOPS}-loop model run with more loops",
            [_regresses(losses[r] - losses[PROBE_LOOPS], n) for r, n in zip(later, noise)],
            [f"{probe_name}: held-out loss " + ", ".join(f"L={r}: {losses[r]:.4f}"
                                                       for r in sorted(losses)),
             *(n["line"] for n in noise if n)],
            caveat=_noise_note(noise))
    # ... and in training (models trained with 3 or 4 loops vs the one trained with 2)
    by_loops = {m["trained_loops"]: name for name, m in study["models"].items()}
    trained = {loops: study["models"][name]["eval"][str(loops)]["loss"]
               for loops, name in by_loops.items()}
    later = [r for r in sorted(trained) if r > PROBE_LOOPS]
    noise = [_paired_noise(study, (by_loops[r], r), (by_loops[PROBE_LOOPS], PROBE_LOOPS))
             for r in later]
    finding("Loops 3 and 4 regress: models trained with more loops",
            [_regresses(trained[r] - trained[PROBE_LOOPS], n) for r, n in zip(later, noise)],
            ["held-out loss by trained loop count: " + ", ".join(f"L={r}: {trained[r]:.4f}"
                                                                 for r in sorted(trained)),
             *(n["line"] for n in noise if n)],
            caveat=_noise_note(noise))
    # 6. the headline: two loops are best
    best = min(trained, key=trained.get)
    rivals = [r for r in sorted(trained) if r != PROBE_LOOPS]
    noise = [_paired_noise(study, (by_loops[r], r), (by_loops[PROBE_LOOPS], PROBE_LOOPS))
             for r in rivals]
    finding("Two loops are best (lowest held-out loss of the family)",
            [best == PROBE_LOOPS] if len(trained) > 1 else [],
            [f"lowest held-out loss: the model trained with L={best} ({trained[best]:.4f}) "
             f"of {len(trained)} trained loop counts", *(n["line"] for n in noise if n)],
            caveat=_noise_note(noise, regression_claim=False))
    return findings


def _paired_noise(study: dict, run: tuple[str, int], reference: tuple[str, int]) -> dict | None:
    """Loss of `run` minus loss of `reference` ((model, loops) each) over the diagnostics'
    windows, with 2 standard errors of the mean paired difference; None unless both runs
    scored the same windows."""
    diag_a = study["models"][run[0]]["diagnostics"]
    diag_b = study["models"][reference[0]]["diagnostics"]
    if "loss_per_window" not in diag_a or diag_a.get("windows_sha256") != diag_b.get("windows_sha256"):
        return None
    a, b = diag_a["loss_per_window"][run[1] - 1], diag_b["loss_per_window"][reference[1] - 1]
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    two_se = 2 * (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5
    label = lambda r: f"{r[0]} at L={r[1]}"  # noqa: E731
    return {"mean": mean, "two_se": two_se, "significant": abs(mean) > two_se,
            "line": f"{label(run)} minus {label(reference)}: {mean:+.4f} ± {two_se:.4f} "
                    f"(2 standard errors, paired over the diagnostics' {n} windows)"}


def _regresses(loss_increase: float, noise: dict | None) -> bool:
    """A loss increase counts as a regression only beyond 2 standard errors (when measured)."""
    return loss_increase > 0 and (noise is None or noise["significant"])


def _noise_note(noise: list[dict | None], regression_claim: bool = True) -> str:
    measured = [n for n in noise if n]
    if not measured:
        return ""
    within = sum(not n["significant"] for n in measured)
    if not within:
        return "every loss difference exceeds 2 standard errors"
    return (f"{within} of {len(measured)} loss differences are within 2 standard errors, "
            "not significant on this many tokens"
            + ("; a regression counts only beyond that" if regression_claim else ""))


# ---- the report ---------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _eval_row(label: str, result: dict) -> list[str]:
    return [label, f"{result['loss']:.4f}", f"{result['perplexity']:.2f}",
            f"{result['accuracy']:.4f}", str(result["tokens"])]


def study_figures(study: dict) -> list[tuple[str, object]]:
    """(file stem, Figure): held-out loss vs loops, and each metric vs loop for every run."""
    from matplotlib.figure import Figure

    figures = []
    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.subplots()
    trained = sorted((m["trained_loops"], m["eval"][str(m["trained_loops"])]["loss"])
                     for m in study["models"].values())
    ax.plot(*zip(*trained), marker="o", linewidth=2, label="trained with L loops, run at L")
    probe_eval = study["models"][study["probe"]]["eval"]
    inference = sorted((int(r), e["loss"]) for r, e in probe_eval.items())
    ax.plot(*zip(*inference), marker="s", linestyle="--",
            label=f"{study['probe']} (trained with {PROBE_LOOPS}), run at L")
    ax.set_xticks(range(1, study["max_inference_loops"] + 1))
    ax.set_xlabel("loops L")
    ax.set_ylabel("held-out loss [nats/token]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figures.append(("loss_vs_loops", fig))

    runs = _runs(study)
    for metric in diagnostics.METRICS:
        if not any(v is not None for _, per_loop in runs for v in per_loop[metric.key]):
            continue
        fig = Figure(figsize=(5.2, 3.4), layout="constrained")
        ax = fig.subplots()
        for label, per_loop in runs:
            xs, ys = diagnostics._defined(range(1, len(per_loop[metric.key]) + 1),
                                          per_loop[metric.key])
            ax.plot(xs, ys, marker="o", label=label,
                    linestyle="--" if label.startswith(study["probe"] + " run") else "-")
        diagnostics.log_scale_if_wide(ax, [v for _, per_loop in runs for v in per_loop[metric.key]])
        ax.set_xticks(range(1, study["max_inference_loops"] + 1))
        ax.set_xlabel("loop r")
        ax.set_title(metric.label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        figures.append((metric.key, fig))
    return figures


def render_report(study: dict, figure_names: list[str]) -> str:
    probe_name = study["probe"]
    models = study["models"]
    probe = models[probe_name]
    lines = [
        "# Loop-count study of the plt-port model family",
        "",
        f"Generated by `{study['command']}`: every number, table, plot and verdict below comes "
        "from the models in `study.json`; nothing is typed in. Diagnostics use "
        f"{study['diagnostic_tokens']} held-out tokens in windows of {study['seq_len']} "
        "(definitions: `plt_port/diagnostics.py`, SPEC section 8).",
        "",
        *(["Sections: held-out evaluation and the comparison with LoopCoder-v2 on the "
           "stdlib family; [variable chains](#variable-chains-task-accuracy-by-depth): task "
           "accuracy by depth on the chains family; per-loop diagnostics.", ""]
          if "chains" in study else []),
        "## Held-out evaluation",
        "",
        "Each family model at the loop count it was trained with:",
        "",
    ]
    rows = [_eval_row(name, m["eval"][str(m["trained_loops"])])
            + [str(m["trained_loops"]), f"{m['parameters']:,}"]
            for name, m in sorted(models.items(), key=lambda kv: kv[1]["trained_loops"])]
    lines += _table(["model", "loss", "perplexity", "accuracy", "tokens", "trained loops",
                     "parameters"], rows)
    lines += ["", f"The {PROBE_LOOPS}-loop model `{probe_name}` run at other inference loop "
                  "counts. The last column is the diagnostics' loss at loop r (logit lens of h^(r), one "
                  f"forward at {probe['diagnostics']['loops']} loops) on the first "
                  f"{probe['diagnostics']['windows']} of the same windows: loop r of a "
                  "longer run is exactly the model run with r loops.", ""]
    lens_loss = probe["diagnostics"]["per_loop"]["loss"]
    rows = [_eval_row(f"L={r}", e) + [f"{lens_loss[int(r) - 1]:.4f}"]
            for r, e in sorted(probe["eval"].items(), key=lambda kv: int(kv[0]))]
    lines += _table(["inference loops", "loss", "perplexity", "accuracy", "tokens",
                     "diagnostics loss"], rows)
    lines += ["", "![held-out loss vs loops](figures/loss_vs_loops.png)", ""]

    lines += ["## Comparison with the published LoopCoder-v2 pattern", "",
              "Published finding (LoopCoder-v2 analysis, SPEC section 8): loop 2 has the largest "
              "effective rank and output shift; later loops oscillate (negative alignment); the "
              "gate mean stays above 0.5; loops 3 and 4 regress, so two loops are best. Each "
              "point is checked below against this study's numbers; the verdict is computed "
              "(agree: every run checked agrees, partly agree: some do, differ: none do).", ""]
    for item in compare_with_loopcoder(study):
        note = f" ({item['note']})" if item["note"] else ""
        caveat = f" ({item['caveat']})" if item["caveat"] else ""
        lines.append(f"- {item['claim']}{note}. Small models: **{item['verdict']}**{caveat}.")
        lines += [f"  - {e}" for e in item["evidence"]]
    lines += [""]

    if "chains" in study:
        lines += study_chains.report(study["chains"])

    lines += ["## Per-loop diagnostics", "",
              "Solid lines: each model at its trained loop count; dashed: "
              f"`{probe_name}` run at 1..{probe['diagnostics']['loops']} loops.", ""]
    for key in figure_names:
        if key in diagnostics.METRIC_BY_KEY:
            lines.append(f"![{diagnostics.METRIC_BY_KEY[key].label}](figures/{key}.png)")
    lines += [""]
    lines += ["Metrics (rows of the tables below):", ""]
    lines += [f"- `{m.key}`: {m.label}" + (f" (from loop {m.first_loop})" if m.first_loop > 1
                                            else "") for m in diagnostics.METRICS]
    lines += [""]
    for name, model in sorted(models.items(), key=lambda kv: kv[1]["trained_loops"]):
        view = model["diagnostics"] if name == probe_name else trained_view(model)
        scales = (f"; CLP input a E + b n(h) with a = {view['emb_scale']:g}, "
                  f"b = {view['hidden_scale']:g}, so the input mismatch is b x offset_cost"
                  if "hidden_scale" in view and model["trained_loops"] > 1 else "")
        lines += [f"### {name}: loops 1..{view['loops']} (trained with "
                  f"{model['trained_loops']}{scales})", "", diagnostics.format_table(view), ""]
    per_layer_links = ", ".join(f"[{key}]({FIGURE_DIR}/{PER_LAYER_DIR}/{key}.png)"
                                for key in figure_names if key in diagnostics.METRIC_BY_KEY)
    lines += [f"Per-layer plots of `{probe_name}` at 1..{probe['diagnostics']['loops']} loops "
              f"(one line per layer): {per_layer_links}. Per-layer values of every model are in "
              "`study.json` (`models.<name>.diagnostics.per_layer`).", ""]
    return "\n".join(lines)


def write_study(study: dict, out_dir: str) -> str:
    with atomic_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, FIGURE_DIR))
        with open(os.path.join(tmp, "study.json"), "w", encoding="utf-8") as f:
            json.dump(study, f, indent=1)
            f.write("\n")
        names = []
        chain_figures = study_chains.figures(study["chains"]) if "chains" in study else []
        for name, fig in study_figures(study) + chain_figures:
            fig.savefig(os.path.join(tmp, FIGURE_DIR, f"{name}.png"), dpi=110)
            names.append(name)
        os.makedirs(os.path.join(tmp, FIGURE_DIR, PER_LAYER_DIR))
        for name, fig in diagnostics.figures(study["models"][study["probe"]]["diagnostics"]):
            fig.savefig(os.path.join(tmp, FIGURE_DIR, PER_LAYER_DIR, f"{name}.png"), dpi=110)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_report(study, names))
    return out_dir


def load_study(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            study = json.load(f)
    except json.JSONDecodeError as exc:
        raise StudyError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(study, dict) or not {"probe", "models"} <= study.keys():
        raise StudyError(f"{path}: not a study.json written by plt-port study")
    return study
