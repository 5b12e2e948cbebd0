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
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("plt_port.demo")

CARD_NAME = "MODEL_CARD.md"


def card_paths(model_dir: str) -> list[str]:
    """Where a model card may be: next to the weights, beside the model dir (the family
    folder), then the packaged family's card."""
    import plt_port

    package_card = os.path.join(os.path.dirname(plt_port.__file__), "models", CARD_NAME)
    model_dir = os.path.abspath(model_dir)
    return [os.path.join(model_dir, CARD_NAME),
            os.path.join(os.path.dirname(model_dir), CARD_NAME), package_card]


@dataclass
class CardTable:
    heading: str        # the markdown heading above the table
    caption: str        # the paragraph line just above it
    lines: list[str]    # header, separator, rows


def markdown_tables(text: str) -> list[CardTable]:
    tables, heading, caption, current = [], "", "", []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
            continue
        if len(current) >= 3:
            tables.append(CardTable(heading, caption, current))
        current = []
        if line.startswith("#"):
            heading, caption = line.lstrip("#").strip(), ""
        elif line.strip():
            caption = line.strip()
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*`").strip() for c in line.strip().strip("|").split("|")]


def _number(cell: str) -> float | None:
    cell = cell.replace(",", "")
    return float(cell) if re.fullmatch(r"[-+]?\d+(\.\d+)?", cell) else None


def _loop_count(header_cell: str) -> int | None:
    """`L=3`, `3 loops`, `loops 3` -> 3: a column of one inference loop count."""
    match = re.fullmatch(r"(?:l\s*=\s*|loops?\s*)(\d+)|(\d+)\s*loops?", header_cell.lower())
    return int(match.group(1) or match.group(2)) if match else None


def loss_series(table: CardTable) -> dict[str, tuple[list[float], list[float]]]:
    """{series: (loop counts, losses)} of a loss table in either layout: a matrix (rows:
    models, columns: `L=n`), or a 'loops' column beside a 'loss' column (rows grouped by the
    first column, e.g. the model, when that is not the loop column)."""
    header = _cells(table.lines[0])
    rows = [_cells(line) for line in table.lines[2:]]
    series: dict[str, tuple[list[float], list[float]]] = {}

    def add(name, x, y):
        if x is not None and y is not None:
            xs, ys = series.setdefault(name, ([], []))
            xs.append(float(x))
            ys.append(y)

    column_loops = [_loop_count(h) for h in header[1:]]
    if any(n is not None for n in column_loops):
        for cells in rows:
            for n, cell in zip(column_loops, cells[1:]):
                add(cells[0], n, _number(cell))
        return series
    lower = [h.lower() for h in header]
    loop_col = next((i for i, h in enumerate(lower) if "loop" in h), None)
    loss_col = next((i for i, h in enumerate(lower) if "loss" in h), None)
    if loop_col is None or loss_col is None:
        return {}
    for cells in rows:
        if len(cells) > max(loop_col, loss_col):
            add(cells[0] if loop_col != 0 else "held-out loss", _number(cells[loop_col]),
                _number(cells[loss_col]))
    return series


def held_out_loss_table(text: str) -> CardTable | None:
    """The card's table of loss per loop count: among the tables about a loss whose numbers
    parse, prefer held-out (eval/validation) ones, then the matrix across loop counts."""
    def words(t: CardTable) -> str:
        return f"{t.heading} {t.caption} {t.lines[0]}".lower()

    tables = [t for t in markdown_tables(text) if "loss" in words(t) and loss_series(t)]
    tables.sort(key=lambda t: (not re.search(r"held|eval|valid", words(t)),
                               all(_loop_count(h) is None for h in _cells(t.lines[0]))))
    return tables[0] if tables else None


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
            table = held_out_loss_table(f.read())
        if table is None:
            continue
        figure = loss_figure(loss_series(table), table.heading or "held-out loss")
        note = (f"{reason}\n\n**{table.heading or 'Held-out loss'}** (model card `{path}`)"
                f"{': ' + table.caption if table.caption else ''}\n\n" + "\n".join(table.lines))
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
