"""`effitune runs`: every run under a folder, side by side, read from the files each run leaves.

A run folder holds config.yaml, state.json (the phases and their validation accuracy), metrics.json
(test metrics and wall time, once finished) and model/ (the bundle). Tuning trials are run folders
too (without a bundle). Nothing is recorded twice: this module only reads. The best run is the one
with the highest *validation* accuracy; picking by test accuracy would leak the test split into the
choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .errors import UserError

COLUMNS = ("run", "status", "backbone", "size", "unfreeze", "best_phase", "epochs", "val_acc", "test_acc",
           "wall_s", "bundle_mb")


def is_run(folder: Path) -> bool:
    """A run folder: its config and what any stage of a run leaves (a split, phases, metrics)."""
    return (folder / "config.yaml").is_file() and any((folder / name).is_file()
                                                      for name in ("state.json", "metrics.json", "manifest.csv"))


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under `root` (or `root` itself), sorted; a run's own subfolders are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder. Pass the folder your runs are in (default: runs).")
    found = []
    for current, dirs, _ in os.walk(root):
        folder = Path(current)
        if is_run(folder):
            found.append(folder)
        if is_run(folder) and ((folder / "state.json").is_file() or (folder / "metrics.json").is_file()):
            dirs[:] = []  # a run's own subfolders hold no runs (a config + split alone may be a work folder)
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("features", "phases"))
    return sorted(found)


def describe(folder: Path, root: Path | None = None) -> dict:
    """One row of the listing for one run folder (missing pieces are None)."""
    config = _read_yaml(folder / "config.yaml")
    state = _read_json(folder / "state.json") or {"done": {}, "best": None}
    metrics = _read_json(folder / "metrics.json") or {}
    phases = state.get("done", {})
    best = state.get("best")
    bundle = folder / "model"
    status = "done" if (bundle / "effitune.json").is_file() else "trial" if (folder.parent.name == "trials"
                                                                             and phases) else "incomplete"
    return {
        "run": str(folder.relative_to(root)) if root and folder != root else str(folder),
        "status": status,
        "backbone": config.get("model", {}).get("backbone"),
        "size": config.get("data", {}).get("image_size"),
        "unfreeze": str(config.get("train", {}).get("unfreeze")),
        "best_phase": best,
        "epochs": sum(int(p.get("epochs") or 0) for p in phases.values()) or None,
        "val_acc": phases[best]["val_acc"] if best in phases else None,
        "test_acc": metrics.get("accuracy"),
        "wall_s": metrics.get("wall_seconds") or (round(sum(p.get("seconds", 0) for p in phases.values()), 1)
                                                   if phases else None),
        "bundle_mb": round(_size(bundle) / 1e6, 1) if bundle.is_dir() else None,
    }


def list_runs(root: str | Path = "runs", sort: str = "val_acc") -> list[dict]:
    """Rows for every run under `root`, best validation accuracy first; the best one has best=True."""
    if sort not in COLUMNS:
        raise UserError(f"Cannot sort by '{sort}': choose one of {', '.join(COLUMNS)}.")
    root = Path(root)
    rows = [describe(folder, root) for folder in find_runs(root)]
    scored = [row for row in rows if row["val_acc"] is not None]
    winner = max(scored, key=lambda row: row["val_acc"]) if scored else None
    for row in rows:
        row["best"] = row is winner
    descending = sort not in ("run", "status", "backbone")
    return sorted(rows, key=lambda row: _sort_key(row[sort], descending))


def _sort_key(value, descending: bool):
    if value is None:
        return (1, 0)
    if isinstance(value, (int, float)):
        return (0, -value if descending else value)
    return (0, str(value))


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
