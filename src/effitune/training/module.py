"""The LightningModule for one phase: cross-entropy, AdamW, warmup + cosine, frozen BatchNorm.

What the phase sees as input depends on the feature cache: pooled features (stage 1, head only),
frozen-prefix activations (stage 2, the trainable tail only) or images (the full network, uncached).
Convolutions train in channels_last on every device, whether the frozen-prefix cache was computed
in this run or reused: one format means one result for one seed (and on a CPU it is the faster one:
~1.6x for lite0's last three stages at 96 px, docs/benchmarks.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from ..data.batches import pad_batch
from ..models.network import Network
from .stages import Phase, freeze_for, set_train_mode

INPUTS = ("features", "prefix", "images")


@dataclass
class Optimization:
    lr: float
    weight_decay: float
    epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1


class PhaseModule(L.LightningModule):
    def __init__(self, network: Network, phase: Phase, inputs: str, optimization: Optimization,
                 train_bn: bool = False, class_weights: torch.Tensor | None = None, batch_augment=None,
                 pad_batches: bool = False):
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}")
        self.network, self.phase, self.inputs = network, phase, inputs
        self.optimization, self.train_bn = optimization, train_bn
        self.batch_augment = batch_augment  # per-sample augmentation of whole batches on the device
        # GPU: a partial last batch is padded to the full batch's shape (batches.pad_batch: each new
        # shape costs cuDNN seconds) and its padding cut from the logits before the loss and metrics
        self.pad_batches = pad_batches
        self._full_batch: dict[str, int] = {}
        self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=optimization.label_smoothing)
        freeze_for(network, phase, train_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "features":
            return self.network.head(x.float())
        if self.inputs == "prefix":  # cached as float16: one copy to float32 in channels_last
            return self.network.tail(x.to(torch.float32, memory_format=torch.channels_last), self.phase.depth)
        return self.network(x.contiguous(memory_format=torch.channels_last))

    def configure_model(self) -> None:
        # before Lightning wraps the model: DDP lays out its gradient buckets for the strides it sees then
        # (the caller, `_fit_phase`, puts the network back to contiguous when fit ends, however it ends)
        if self.inputs != "features":
            self.network.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            set_train_mode(self.network, self.phase, self.train_bn)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever mode the module was left in (it only restores it after validation):
        # set the phase's modes here, or a network put in eval mode earlier (caching) would train with
        # dropout off, and one never put in eval mode would update its frozen BatchNorm statistics.
        self.train()

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        x, y = batch
        if self.batch_augment is not None and self.inputs == "images" and self.trainer.training:
            x = self.batch_augment(x)
        return x, y

    def _logits(self, x: torch.Tensor, split: str) -> torch.Tensor:
        # padding changes nothing for the real rows unless BatchNorm computes batch statistics
        if not self.pad_batches or (self.train_bn and split == "train"):
            return self(x)
        full = self._full_batch[split] = max(self._full_batch.get(split, 0), len(x))
        return self(pad_batch(x, full))[:len(x)]

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self._logits(x, split)
        loss = self.loss(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        on_step = split == "train"
        # sync_dist: averaged over ranks, so val_acc (checkpoints, early stopping, the best phase) agrees
        self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=not on_step, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{split}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        o = self.optimization
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # biases: no weight decay, as usual
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=o.lr)
        total = max(1, o.epochs * o.steps_per_epoch)
        warmup = min(total - 1, int(o.warmup_epochs * o.steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    """Linear warmup to 1, then cosine down to `floor` (lr/100 by default)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
