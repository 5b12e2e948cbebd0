"""The Loop analysis tab: per-loop diagnostics as images, or the family's held-out loss.

`plt_port.diagnostics.loop_analysis_figures(model_dir, loops=...)` makes the figures. When it
is missing or fails, the tab falls back to the held-out rows of the model card
(`heldout.json`, written with MODEL_CARD.md by `plt-port card`): a plot of loss per loop count
and their table, else a note; nothing here raises into the page.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

from plt_port.family import HELDOUT_JSON

log = logging.getLogger("plt_port.demo")

HELDOUT_NAME = os.path.basename(HELDOUT_JSON)


def heldout_paths(model_dir: str) -> list[str]:
    """Where held-out rows may be: next to the weights, beside the model dir (its family
    folder), then the packaged family's."""
    model_dir = os.path.abspath(model_dir)
    return [os.path.join(model_dir, HELDOUT_NAME),
            os.path.join(os.path.dirname(model_dir), HELDOUT_NAME), HELDOUT_JSON]


def loss_series(heldout: dict) -> dict[str, tuple[list[float], list[float]]]:
    """{model: (inference loop counts, held-out losses)} of the rows run at a loop count."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in heldout["rows"]:
        if isinstance(row["loops"], int):
            xs, ys = series.setdefault(row["model"], ([], []))
            xs.append(float(row["loops"]))
            ys.append(float(row["loss"]))
    return series


def heldout_table(heldout: dict) -> str:
    lines = ["| model | loops | loss | perplexity | accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['loops']} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
              f"{100 * r['accuracy']:.2f}% |" for r in heldout["rows"]]
    return "\n".join(lines)


def loss_figure(series: dict[str, tuple[list[float], list[float]]], title: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        order = np.argsort(xs)
        ax.plot(np.array(xs)[order], np.array(ys)[order], marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("loops at inference")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return fig


def figure_image(fig) -> np.ndarray:
    """RGB pixels of a matplotlib figure (Agg), closing it if pyplot manages it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return image


def read_heldout(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            heldout = json.load(f)
        return heldout if loss_series(heldout) else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable held-out rows %s: %s", path, exc)
        return None


def heldout_fallback(model_dir: str, reason: str):
    """(plot of the held-out loss per loop count or None, markdown note)."""
    for path in heldout_paths(model_dir):
        heldout = read_heldout(path) if os.path.isfile(path) else None
        if heldout is None:
            continue
        where = os.path.join(os.path.basename(os.path.dirname(path)), HELDOUT_NAME)
        figure = loss_figure(loss_series(heldout), "held-out loss per inference loop count")
        note = (f"{reason}\n\n**Held-out results** (`{where}`, {heldout['tokens']} predicted "
                f"tokens of the {heldout['split']} split; loss in nats per token, accuracy of "
                f"the next token)\n\n" + heldout_table(heldout))
        return figure, note
    return None, f"{reason}\n\nNo held-out results were found for this model."


def loop_analysis(model_dir: str, loops: int):
    """(diagnostics images with captions, card figure or None, markdown note); never raises."""
    try:
        from plt_port.diagnostics import loop_analysis_figures
    except ImportError as exc:
        return [], *heldout_fallback(model_dir, f"Per-loop diagnostics are not available "
                                                   f"here ({exc}); showing the held-out results instead.")
    try:
        figures = loop_analysis_figures(model_dir, loops=loops)
        images = [(figure_image(fig), title) for title, fig in figures]
    except Exception as exc:  # noqa: BLE001 - the tab must survive any failure in there
        log.error("loop analysis failed", exc_info=exc)
        return [], *heldout_fallback(model_dir, f"Per-loop diagnostics failed "
                                                   f"({type(exc).__name__}: {exc}); showing the "
                                                   "held-out results instead.")
    name = os.path.basename(os.path.normpath(model_dir))  # never a local path in the page
    return images, None, f"Per-loop diagnostics of **{name}** at {loops} loops."
