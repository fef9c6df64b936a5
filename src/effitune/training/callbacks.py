"""Small Lightning callbacks: the per-epoch history CSV and the cached-view cycling."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L

HISTORY_COLUMNS = ("phase", "stage", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


class HistoryWriter(L.Callback):
    """Appends one row per epoch to `history.csv` (the curves in reports come from it); rank 0 alone writes."""

    def __init__(self, path: Path, phase_name: str, stage: int):
        self.path, self.phase_name, self.stage = Path(path), phase_name, stage
        self._started = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        """On resume, forget rows of epochs that will run again (written after the last checkpoint)."""
        if not trainer.is_global_zero:
            return
        rows = read_history(self.path)
        kept = [r for r in rows if not (r["phase"] == self.phase_name and int(r["epoch"]) >= trainer.current_epoch)]
        if len(kept) != len(rows):
            with open(self.path, "w", newline="") as stream:
                writer = csv.DictWriter(stream, fieldnames=HISTORY_COLUMNS)
                writer.writeheader()
                writer.writerows(kept)

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics  # logged with sync_dist: the same on every rank
        value = lambda key: f"{float(metrics[key]):.6f}" if key in metrics else ""  # noqa: E731
        row = {"phase": self.phase_name, "stage": self.stage, "epoch": trainer.current_epoch,
               "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.3e}",
               "train_loss": value("train_loss"), "train_acc": value("train_acc"),
               "val_loss": value("val_loss"), "val_acc": value("val_acc"),
               "seconds": f"{time.perf_counter() - self._started:.2f}"}
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=HISTORY_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)


class SetEpoch(L.Callback):
    """Data that changes with the epoch follows Lightning's epoch counter, also in a resumed run:
    the cached view trained on (view e % views, see train.features), ImageBatches' shuffle order."""

    def __init__(self, data):
        self.data = data

    def on_train_epoch_start(self, trainer, pl_module):
        self.data.set_epoch(trainer.current_epoch)


def read_history(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))
