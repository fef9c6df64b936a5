"""Where a run's time went: a flat {step: seconds} table, written as RUN/timings.json.

Every step of `train` is timed with `Timings.step(name)`; `wall_seconds` is the whole call and
`unaccounted_seconds` what no step covered, so the table adds up to the wall time by construction
and a large remainder points at an untimed stall. A step run twice (or resumed) adds up.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from . import files

FILE = "timings.json"


class Timings:
    def __init__(self, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.steps: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + seconds

    def to_dict(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        table = {name: round(seconds, 2) for name, seconds in self.steps.items()}
        table["unaccounted_seconds"] = round(max(0.0, wall - sum(self.steps.values())), 2)
        table["wall_seconds"] = round(wall, 2)
        return table

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        return files.write_text(path, json.dumps(self.to_dict(), indent=2))


def read(folder: str | Path) -> dict[str, float] | None:
    """A run's timings.json, or None when it has none (runs from before it existed, or unreadable)."""
    try:
        return json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return None


def ranked(timings: dict[str, float]) -> list[tuple[str, float, float | None]]:
    """(step, seconds, share of the wall time or None), the longest steps first."""
    wall = timings.get("wall_seconds") or 0.0
    steps = sorted(((k, v) for k, v in timings.items() if k != "wall_seconds"), key=lambda item: -item[1])
    return [(name, seconds, seconds / wall if wall else None) for name, seconds in steps]


def table_lines(timings: dict[str, float]) -> list[str]:
    """`step  seconds  share` lines, the longest steps first, the wall time last."""
    steps = ranked(timings)
    width = max([len(name) for name, _, _ in steps] + [4])
    lines = [f"{name:<{width}}  {seconds:8.1f} s" + (f"  {share:6.1%}" if share is not None else "")
             for name, seconds, share in steps]
    return lines + [f"{'wall':<{width}}  {timings.get('wall_seconds') or 0.0:8.1f} s"]
