"""Figures people would rather look at: label overlays on CT, and per-organ charts.

Everything renders with matplotlib's Agg backend (no display needed) and is
written atomically as PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaresam.data.window import DEFAULT_WINDOW, Window, apply_window
from flaresam.io.atomic import atomic_path
from flaresam.organs import FLARE22, LabelSet

OVERLAY_ALPHA = 0.45


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def label_colors(labels: LabelSet = FLARE22) -> np.ndarray:
    """RGB float table [num_classes, 3] indexed by label id (0 = background, unused)."""
    table = np.zeros((labels.num_classes, 3))
    for o in labels.organs:
        table[o.id] = np.asarray(o.color) / 255.0
    return table


def overlay(gray: np.ndarray, label: np.ndarray | None, alpha: float = OVERLAY_ALPHA, labels: LabelSet = FLARE22) -> np.ndarray:
    """uint8 grey slice + label slice -> RGB float image with organs tinted in their colours."""
    rgb = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    if label is not None:
        mask = label > 0
        colors = label_colors(labels)[label]
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors[mask]
    return rgb


def _present_handles(slices: Sequence[np.ndarray], labels: LabelSet) -> list[Any]:
    from matplotlib.patches import Patch

    present = sorted({int(v) for lab in slices for v in np.unique(lab) if v > 0})
    return [Patch(color=_rgb01(labels.by_id[i].color), label=labels.by_id[i].display) for i in present]


def _rgb01(color: tuple[int, int, int]) -> tuple[float, float, float]:
    """An organ's 0..255 RGB as matplotlib's 0..1 floats."""
    r, g, b = color
    return r / 255.0, g / 255.0, b / 255.0


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    plt = _pyplot()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return target


def preview(
    hu: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, float, float],
    path: str | os.PathLike[str],
    window: Window = DEFAULT_WINDOW,
    title: str | None = None,
    labels: LabelSet = FLARE22,
) -> Path:
    """Axial, coronal and sagittal views through the labelled region, labels over the CT (named and coloured by ``labels``)."""
    plt = _pyplot()
    gray = apply_window(hu, window)
    if label.any():
        zs, ys, xs = np.nonzero(label)
        cz, cy, cx = int(np.median(zs)), int(np.median(ys)), int(np.median(xs))
        per_slice = (label > 0).sum(axis=(1, 2))
        cz = int(per_slice.argmax())
    else:
        cz, cy, cx = (s // 2 for s in label.shape)
    sz, sy, sx = spacing
    views = [
        ("axial", gray[cz], label[cz], sy / sx),
        ("coronal", gray[::-1, cy, :], label[::-1, cy, :], sz / sx),
        ("sagittal", gray[::-1, :, cx], label[::-1, :, cx], sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, g, lab, aspect) in zip(axes, views):
        ax.imshow(overlay(g, lab, labels=labels), aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = _present_handles([v[2] for v in views], labels)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def organ_bar_chart(
    values: dict[str, dict[str, float]],
    path: str | os.PathLike[str],
    metric: str = "Dice",
    title: str | None = None,
    labels: LabelSet = FLARE22,
) -> Path:
    """Grouped bars: ``values[model][organ_name] -> score`` for each organ of ``labels``."""
    plt = _pyplot()
    models = list(values)
    organs = [o for o in labels.organs if any(o.name in values[m] for m in models)]
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(organs))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(organs) + 2), 4.5))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        ys = [values[m].get(o.name, np.nan) for o in organs]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, ys, width, label=m, color=cmap(i % 10))
    ax.set_xticks(x)
    ax.set_xticklabels([o.display for o in organs], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(models), 4))
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def overlay_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    columns: Sequence[tuple[str, dict[str, np.ndarray] | None]],
    path: str | os.PathLike[str],
    aspect: Sequence[float] | None = None,
    labels: LabelSet = FLARE22,
) -> Path:
    """A Figure-5 style grid: one row per slice, columns CT / ground truth / each model.

    ``rows``: (row title, uint8 grey slice); ``columns``: (column title,
    {row title: label slice}) with None for the plain CT column.
    """
    plt = _pyplot()
    n_r, n_c = len(rows), len(columns)
    fig, axes = plt.subplots(n_r, n_c, figsize=(2.4 * n_c, 2.4 * n_r), squeeze=False)
    all_labels: list[np.ndarray] = []
    for r, (row_title, gray) in enumerate(rows):
        for c, (col_title, col_labels) in enumerate(columns):
            ax = axes[r][c]
            lab = None if col_labels is None else col_labels[row_title]
            if lab is not None:
                all_labels.append(lab)
            ax.imshow(overlay(gray, lab, labels=labels), aspect=(aspect[r] if aspect else 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_title, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_title, fontsize=8)
    handles = _present_handles(all_labels, labels)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


def training_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Training loss and validation mean Dice per epoch, from a run's metrics records.

    Drawn on a bare Figure, not through pyplot: the trainer calls this every
    epoch, and pyplot would keep global state and switch the process's backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in records], marker="o", color="#1f77b4")
    ax1.set(title="Training loss", xlabel="epoch", ylabel="loss")
    dice = [(r["epoch"], r["val_mean_dice"]) for r in records if r.get("val_mean_dice") is not None]
    if dice:
        ax2.plot(*zip(*dice), marker="o", color="#2ca02c")
        ax2.set_ylim(0, 1)
    else:
        ax2.text(0.5, 0.5, "no validation cases", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(title="Validation 2D Dice (mean over organs)", xlabel="epoch", ylabel="Dice")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


def click_curves(curves: Sequence[dict[str, Any]], path: str | os.PathLike[str], baseline: float | None = None,
                 title: str = "2D Dice against corrective clicks") -> Path:
    """Dice after 0..K simulated clicks, one line per model row (``label``, ``slice_dice`` per click count); the
    filled box's Dice as a dashed line, the baseline every row is read against."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for curve in curves:
        dashed = curve.get("kind") == "baseline"
        ax.plot(curve["clicks"], curve["slice_dice"], marker="o", linestyle="--" if dashed else "-", label=curve["label"])
    if baseline is not None and np.isfinite(baseline):
        ax.axhline(baseline, color="grey", linestyle=":", label="Box fill (no model)")
    k = max((max(c["clicks"]) for c in curves), default=0)
    ax.set(title=title, xlabel="corrective clicks after the box", ylabel="2D Dice (all slice-organ pairs)",
           xticks=list(range(k + 1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: no line hidden
    fig.tight_layout()
    return save_figure(fig, path)
