"""The Loop analysis tab: per-loop diagnostics as images, or the model card's held-out loss.

`plt_port.diagnostics.loop_analysis_figures(model_dir, loops=...)` makes the figures. When it
is missing or fails, the tab falls back to the held-out-loss table of the model card (and a
plot of it when its numbers parse), else to a note; nothing here raises into the page.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import numpy as np

log = logging.getLogger("plt_port.demo")

CARD_NAME = "MODEL_CARD.md"


def card_paths(model_dir: str) -> list[str]:
    """Where a model card may be: next to the weights, beside the model dir (the family
    folder), then the packaged family's card."""
    import plt_port

    package_card = os.path.join(os.path.dirname(plt_port.__file__), "models", CARD_NAME)
    model_dir = os.path.abspath(model_dir)
    return [os.path.join(model_dir, CARD_NAME), os.path.join(os.path.dirname(model_dir), CARD_NAME),
            package_card]


def markdown_tables(text: str) -> list[tuple[str, list[str]]]:
    """(heading above, table lines) of every pipe table in a markdown text."""
    tables, heading, current = [], "", []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
            continue
        if len(current) >= 3:
            tables.append((heading, current))
        current = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return tables


def held_out_loss_table(text: str) -> tuple[str, list[str]] | None:
    """The card's held-out loss table: the first table whose header names a loss, preferring
    one whose heading or header says held-out/eval."""
    candidates = [(h, t) for h, t in markdown_tables(text) if "loss" in t[0].lower()]
    for heading, table in candidates:
        if re.search(r"held|eval|valid", heading + table[0], re.IGNORECASE):
            return heading, table
    return candidates[0] if candidates else None


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*`").strip() for c in line.strip().strip("|").split("|")]


def _number(cell: str) -> float | None:
    match = re.fullmatch(r"[-+]?\d+(\.\d+)?", cell.replace(",", ""))
    return float(cell.replace(",", "")) if match else None


def loss_series(table: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """{series: (loop counts, losses)} from a table with a 'loop' column and a 'loss' column;
    rows are grouped by the first column when that is not the loop column (e.g. a model)."""
    header = [h.lower() for h in _cells(table[0])]
    loop_col = next((i for i, h in enumerate(header) if "loop" in h), None)
    loss_col = next((i for i, h in enumerate(header) if "loss" in h), None)
    if loop_col is None or loss_col is None:
        return {}
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line in table[2:]:
        cells = _cells(line)
        if len(cells) <= max(loop_col, loss_col):
            continue
        x, y = _number(cells[loop_col]), _number(cells[loss_col])
        if x is None or y is None:
            continue
        name = cells[0] if loop_col != 0 else "held-out loss"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(x)
        ys.append(y)
    return series


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


def model_card_fallback(model_dir: str, reason: str):
    """(plot of the card's held-out loss per loop count or None, markdown note)."""
    for path in card_paths(model_dir):
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            found = held_out_loss_table(f.read())
        if found is None:
            continue
        heading, table = found
        series = loss_series(table)
        figure = loss_figure(series, heading or "held-out loss") if series else None
        note = (f"{reason}\n\n**{heading or 'Held-out loss'}** (from `{path}`):\n\n"
                + "\n".join(table))
        return figure, note
    return None, f"{reason}\n\nNo model card with a held-out loss table was found for this model."


def loop_analysis(model_dir: str, loops: int):
    """(diagnostics images with captions, card figure or None, markdown note); never raises."""
    try:
        from plt_port.diagnostics import loop_analysis_figures
    except ImportError as exc:
        return [], *model_card_fallback(model_dir, f"Per-loop diagnostics are not available "
                                                   f"here ({exc}); showing the model card instead.")
    try:
        figures = loop_analysis_figures(model_dir, loops=loops)
        images = [(figure_image(fig), title) for title, fig in figures]
    except Exception as exc:  # noqa: BLE001 - the tab must survive any failure in there
        log.error("loop analysis failed", exc_info=exc)
        return [], *model_card_fallback(model_dir, f"Per-loop diagnostics failed "
                                                   f"({type(exc).__name__}: {exc}); showing the "
                                                   "model card instead.")
    return images, None, f"Per-loop diagnostics of `{model_dir}` at {loops} loops."
