"""The report's figures, drawn with matplotlib's object API (no pyplot state, no GUI backend).

Each function takes plain data (lists, dicts, arrays) and returns a `Figure`; `png(figure)` turns one
into bytes. Nothing here reads files or knows about bundles, so every figure is easy to test alone.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

_STAGE_COLOURS = {1: "#eef3fb", 2: "#fbf1e8"}
_BEFORE, _AFTER = "#d9822b", "#2b6cb0"
_SPLIT_COLOURS = {"train": "#2b6cb0", "val": "#d9822b", "test": "#38a169"}


def png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # class names in scripts the font lacks (CJK, emoji): drawn as boxes,
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)  # named in the page's text
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def training_curves(history: Sequence[dict]) -> Figure:
    """Loss, accuracy and learning rate per epoch across all phases; phase boundaries marked.

    `history`: rows of history.csv (phase, stage, epoch, lr, train_loss, train_acc, val_loss, val_acc).
    """
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    x = np.arange(1, len(history) + 1)
    column = {name: np.array([_number(row.get(name)) for row in history])
              for name in ("lr", "train_loss", "train_acc", "val_loss", "val_acc")}
    for ax, (title, keys) in zip(axes, (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")),
                                        ("learning rate", ("lr",)))):
        for key in keys:
            ax.plot(x, column[key], marker="o", markersize=3, label=key.replace("_", " "),
                    color=_AFTER if key.startswith("val") or key == "lr" else _BEFORE)
        ax.set_title(title, pad=14)  # room for the phase names above the axes
        ax.set_xlabel("epoch (all phases)")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        _mark_phases(ax, history)
    if len(history) and np.nanmax(column["lr"], initial=0) > 0:
        axes[2].set_yscale("log")
    return figure


def _mark_phases(ax, history: Sequence[dict]) -> None:
    """Shade each phase by its stage, a dashed line where a phase starts, its name on top."""
    starts = [i for i, row in enumerate(history) if i == 0 or row.get("phase") != history[i - 1].get("phase")]
    for start, stop in zip(starts, starts[1:] + [len(history)]):
        row = history[start]
        ax.axvspan(start + 0.5, stop + 0.5, color=_STAGE_COLOURS.get(int(_number(row.get("stage")) or 1), "#f4f4f4"),
                   zorder=0)
        if start:
            ax.axvline(start + 0.5, color="#666", linestyle="--", linewidth=1)
        ax.text((start + stop + 1) / 2, 1.0, str(row.get("phase", "")).replace("stage2-", ""),
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="#444")


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix: each row shows where one true class's images went."""
    counts = np.asarray(confusion, dtype=float)
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.5, 0.55 * len(classes) + 2.5)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for (i, j), value in np.ndenumerate(normalised):
            if value >= 0.005:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.55 else "black")
    return figure


def reliability_diagram(before: dict, after: dict, temperature: float) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling, and the bin counts.

    `before`/`after`: `calibration.reliability` results ({ece, bins: [{low, high, count, confidence, accuracy}]}).
    """
    figure = Figure(figsize=(6.5, 6), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="#888", linestyle=":", label="perfect calibration")
    for side, (result, colour, name) in enumerate(((before, _BEFORE, "T = 1"),
                                                   (after, _AFTER, f"T = {temperature:.2f}"))):
        bins = result["bins"]
        top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour,
                 label=f"{name}: ECE {result['ece']:.3f}", alpha=0.9)
        width = [(b["high"] - b["low"]) * 0.45 for b in bins]  # before on the left half of a bin, after on the right
        bottom.bar([b["low"] + (0.05 + 0.45 * side) * (b["high"] - b["low"]) for b in bins],
                   [b["count"] for b in bins], width=width, color=colour, alpha=0.8, align="edge")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_yscale("log")
    return figure


def gallery(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 6,
            colours: Sequence[str] | None = None) -> Figure:
    """Thumbnails in a grid, each with a short caption (a few lines) above it."""
    count = max(1, len(images))
    columns = max(1, min(columns, count))
    rows = int(np.ceil(count / columns))
    figure = Figure(figsize=(2.1 * columns, 2.5 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.set_title(captions[i], fontsize=7.5, color=(colours[i] if colours else "black"))
    return figure


def split_distribution(counts: dict[str, dict[str, int]], classes: Sequence[str]) -> Figure:
    """Images per class, one bar per split side by side."""
    parts = [part for part in ("train", "val", "test") if sum(counts.get(part, {}).values())]
    parts += [part for part in counts if part not in parts and sum(counts[part].values())]
    figure = Figure(figsize=(max(6, 0.6 * len(classes) + 3), 3.6), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(parts))
    x = np.arange(len(classes))
    for k, part in enumerate(parts):
        ax.bar(x + k * width - 0.4 + width / 2, [counts[part].get(c, 0) for c in classes], width,
               label=part, color=_SPLIT_COLOURS.get(part, "#718096"))
    ax.set_xticks(x, labels=classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return figure


def shortcut_bars(shortcut: dict) -> Figure:
    """Cross-validated accuracy from each metadata group alone, against the majority-class baseline."""
    groups = shortcut.get("groups", {})
    names = list(groups)
    figure = Figure(figsize=(7, 0.45 * len(names) + 1.4), layout="constrained")
    ax = figure.subplots()
    flagged = set(shortcut.get("flagged", []))
    ax.barh(names, [groups[n]["accuracy"] for n in names],
            color=["#c53030" if n in flagged else "#a0aec0" for n in names])
    ax.axvline(shortcut.get("majority", 0), color="#2d3748", linestyle="--", label="majority class")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("cross-validated accuracy from metadata alone")
    ax.legend(fontsize=8, loc="lower right")
    return figure
