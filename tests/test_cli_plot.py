"""`sage-zmq bench --plot`: every label of the chart is inside the saved image, none overlap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

import itertools

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from sage_zmq.bench import _plot

# Rows like a real run's: long names and competitors, ratios within two decades (where
# matplotlib labels minor ticks too).
ROWS: list[dict[str, Any]] = [
    {
        "name": "shm records/s (cross-process, per-record put/get)",
        "competitor": "raw pyzmq PUSH/PULL ipc, 100 per msgpack frame",
        "ratio": 1.44,
    },
    {
        "name": "shm records/s vs multiprocessing.Queue",
        "competitor": "multiprocessing.Queue",
        "ratio": 1.35,
    },
    {"name": "local records/s (two threads, per-item)", "competitor": "queue.Queue", "ratio": 7.1},
    {
        "name": "work per idle hop (put + get, one thread, inproc)",
        "competitor": "raw pyzmq send + recv + msgpack",
        "ratio": 0.14,
    },
    {"name": "a row without a ratio", "competitor": "x", "ratio": None},
]


class _Layout:
    """Where savefig put things: the area it writes, and the boxes of the chart's texts."""

    def __init__(self, fig: Figure, kwargs: dict[str, Any]) -> None:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        if kwargs.get("bbox_inches") == "tight":
            self.area: Bbox = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        else:
            self.area = fig.bbox
        (ax,) = fig.axes
        self.row_labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        texts = [t for t in ax.get_yticklabels() if t.get_text()] + [ax.xaxis.label, ax.title]
        self.texts = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        lo, hi = ax.get_xlim()
        ticks = [*ax.xaxis.get_majorticklabels(), *ax.xaxis.get_minorticklabels()]
        self.tick_boxes = [
            t.get_window_extent(renderer)
            for t in ticks
            if t.get_text() and t.get_visible() and lo <= t.get_position()[0] <= hi
        ]


def _render(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _Layout:
    seen: list[_Layout] = []
    real = Figure.savefig

    def keep(self: Figure, fname: Any, **kwargs: Any) -> None:
        real(self, fname, **kwargs)
        seen.append(_Layout(self, kwargs))

    monkeypatch.setattr(Figure, "savefig", keep)
    _plot(ROWS, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 0
    (layout,) = seen
    return layout


def test_every_label_is_inside_the_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The row labels were cut off on the left and the x-axis label on the right.
    layout = _render(monkeypatch, tmp_path)
    area = layout.area
    assert len(layout.row_labels) == 4  # the row without a ratio is left out
    for text, box in layout.texts:
        assert area.x0 - 1 <= box.x0 and box.x1 <= area.x1 + 1, text
        assert area.y0 - 1 <= box.y0 and box.y1 <= area.y1 + 1, text
    # A competitor already in the row's name is not repeated ("vs X  vs X").
    labels = [label.replace("\n", " ") for label in layout.row_labels]
    assert sum(label.count("multiprocessing.Queue") for label in labels) == 1


def test_x_tick_labels_do_not_overlap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # With ratios within two decades, matplotlib labelled the minor ticks too (2x10^-1 ...)
    # and the labels ran into each other.
    boxes = sorted(_render(monkeypatch, tmp_path).tick_boxes, key=lambda b: b.x0)
    assert len(boxes) >= 2
    for left, right in itertools.pairwise(boxes):
        assert left.x1 <= right.x0, "tick labels overlap"
