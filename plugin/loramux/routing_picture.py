"""Pictures of per-token routing choices: one SVG heatmap drawer, no plotting library needed.

Rows are labelled on the left (adapters, or tasks); columns are tokens or adapters, optionally
labelled at the top (slanted); a cell's shade is its value, darkest at ``full`` or more. Cells in
``marked`` get an outline (a task's own adapter), ``spans`` underline runs of columns (the parts of
a prompt). Used by ``loramux eval --choices`` and ``benchmarks/token_choices.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Collection, Sequence

import numpy as np

CHAR_WIDTH = 6.2  # monospace at font-size 10, per character (labels' room)
SLANT_UP, SLANT_RIGHT = 0.87, 0.5  # a column label turned 60 degrees: sin and cos of its rise


@dataclass(frozen=True)
class Heatmap:
    """A matrix (rows x columns) of shares in [0, 1] and what to write around it."""

    values: np.ndarray
    row_labels: Sequence[str]
    title: str
    col_labels: Sequence[str] | None = None
    notes: Sequence[str] = ()
    spans: Sequence[tuple[str, int, int]] = ()  # (label, first column, end column)
    marked: Collection[tuple[int, int]] = field(default_factory=frozenset)
    full: float = 0.5
    cell: int = 9

    def svg(self) -> str:
        """The picture as an SVG document."""
        n_rows, n_cols = self.values.shape
        col_text = CHAR_WIDTH * max(map(len, self.col_labels), default=0) if self.col_labels else 0.0
        left = int(CHAR_WIDTH * max(map(len, self.row_labels), default=4)) + 16
        top = 40 + int(col_text * SLANT_UP)  # slanted column labels rise above the grid
        bottom = top + self.cell * n_rows
        texts = [CHAR_WIDTH * 1.3 * len(self.title), *(CHAR_WIDTH * len(n) for n in self.notes)]
        width = int(max(left + self.cell * n_cols + col_text * SLANT_RIGHT, *texts)) + 30
        height = bottom + 30 + 16 * (len(self.notes) + (2 if self.spans else 0))
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">',
            f'<text x="10" y="18" font-size="13">{escape(self.title)}</text>',
        ]
        parts += self._labels(left, top)
        parts += self._cells(left, top)
        parts += self._spans(left, bottom)
        y = bottom + 24 + (28 if self.spans else 0)
        parts += [f'<text x="10" y="{y + 16 * i}">{escape(note)}</text>' for i, note in enumerate(self.notes)]
        parts.append("</svg>")
        return "\n".join(parts) + "\n"

    def _labels(self, left: int, top: int) -> list[str]:
        c = self.cell
        out = [
            f'<text x="{left - 6}" y="{top + c * i + c - 1}" text-anchor="end">{escape(a)}</text>' for i, a in enumerate(self.row_labels)
        ]
        for j, label in enumerate(self.col_labels or ()):
            x, y = left + c * j + c - 2, top - 4
            out.append(f'<text x="{x}" y="{y}" transform="rotate(-60 {x} {y})">{escape(label)}</text>')
        return out

    def _cells(self, left: int, top: int) -> list[str]:
        c, out = self.cell, []
        for i, j in zip(*np.nonzero(self.values > 0.005)):
            shade = int(255 * (1 - min(1.0, float(self.values[i, j]) / self.full)))
            out.append(f'<rect x="{left + c * j}" y="{top + c * i}" width="{c}" height="{c}" fill="rgb({shade},{shade},255)"/>')
        for i, j in sorted(self.marked):
            out.append(f'<rect x="{left + c * j}" y="{top + c * i}" width="{c}" height="{c}" fill="none" stroke="red" stroke-width="1.5"/>')
        return out

    def _spans(self, left: int, bottom: int) -> list[str]:
        out, y = [], bottom + 8
        for label, a, b in self.spans:
            x0, x1 = left + self.cell * a, left + self.cell * b
            out.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="black" stroke-width="2"/>')
            out.append(f'<text x="{x0}" y="{y + 14}">{escape(label)}</text>')
        return out


__all__ = ["Heatmap"]
