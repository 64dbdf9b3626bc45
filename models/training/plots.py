"""The image-level OK/DEFECT confusion matrix as a PNG, drawn with matplotlib's Agg canvas.

A figure and an Agg canvas are made directly (no pyplot), so no global backend is switched and no
display is needed; matplotlib's bundled DejaVu Sans is the only font used, so nothing is fetched.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfusionPanel:
    """One split at one threshold: rows are the truth (OK, DEFECT), columns the decision."""

    title: str
    tp: int
    fp: int
    fn: int
    tn: int
    notes: tuple[str, ...] = ()
    """Printed under the matrix, e.g. "precision not measurable: 0 OK images in test"."""


def confusion_png(panels: Sequence[ConfusionPanel], suptitle: str = "") -> bytes:
    """PNG bytes of one 2x2 count matrix per panel, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no splits to draw")
    fig = Figure(figsize=(4.2 * len(panels), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, p in zip(axes, panels, strict=True):
        counts = [[p.tn, p.fp], [p.fn, p.tp]]
        n_ok, n_def = p.tn + p.fp, p.fn + p.tp
        shares = [
            [c / n if n else 0.0 for c in row] for row, n in zip(counts, (n_ok, n_def), strict=True)
        ]
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(2):
            for j in range(2):
                n_row = (n_ok, n_def)[i]
                ax.text(
                    j,
                    i,
                    f"{counts[i][j]}" + (f"\n{shares[i][j]:.0%}" if n_row else "\n(no images)"),
                    ha="center",
                    va="center",
                    color="white" if shares[i][j] > 0.6 else "black",
                    fontsize=12,
                )
        ax.set_xticks([0, 1], ["OK", "DEFECT"])
        ax.set_yticks([0, 1], [f"OK ({n_ok})", f"DEFECT ({n_def})"])
        ax.set_xlabel("decision")
        ax.set_ylabel("truth (images)")
        ax.set_title(p.title, fontsize=10)
        if p.notes:
            ax.text(
                0.5,
                -0.28,
                "\n".join(p.notes),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color="firebrick",
                wrap=True,
            )
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.subplots_adjust(bottom=0.3, top=0.85, wspace=0.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
