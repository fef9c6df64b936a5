"""Which parameters train in each phase, and keeping BatchNorm frozen.

A *phase* is one Lightning fit: stage 1 trains the new head only; stage 2 trains the last `depth`
whole stages (timm's `blocks[i]`, so residual connections are never cut), the conv head and the
classifier. "all" trains everything. BatchNorm layers stay in inference mode with their affine
parameters frozen unless `train_bn` is set, as in the original Keras fine-tuning recipe: updating
batch statistics on small batches of a new dataset wrecks the pretrained features.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import backbones
from ..models.network import Network

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Phase:
    """`depth=None`: head only (stage 1). `depth=n`: last n stages. `depth=-1`: all layers."""

    depth: int | None

    @property
    def name(self) -> str:
        if self.depth is None:
            return "stage1"
        return "stage2-all" if self.depth < 0 else f"stage2-depth{self.depth}"

    @classmethod
    def from_name(cls, name: str) -> "Phase":
        """The phase a `name` (run state, phase log, bundle) stands for."""
        if name == "stage1":
            return cls(None)
        return cls(-1) if name == "stage2-all" else cls(int(name.removeprefix("stage2-depth")))

    @property
    def stage(self) -> int:
        return 1 if self.depth is None else 2


def trainable_modules(network: Network, phase: Phase) -> list[nn.Module]:
    if phase.depth is None:
        return [backbones.head_module(network.backbone)]
    if phase.depth < 0:
        return [network.backbone]
    return backbones.tail_modules(network.backbone, phase.depth)


def freeze_for(network: Network, phase: Phase, train_bn: bool = False) -> list[nn.Parameter]:
    """Set requires_grad for `phase`; returns the trainable parameters."""
    network.requires_grad_(False)
    for module in trainable_modules(network, phase):
        module.requires_grad_(True)
    if not train_bn:
        for module in network.modules():
            if isinstance(module, BATCHNORM_TYPES):
                module.requires_grad_(False)
    return [p for p in network.parameters() if p.requires_grad]


def set_train_mode(network: Network, phase: Phase, train_bn: bool = False) -> None:
    """network.train() for the trainable part only: frozen layers (and BN unless train_bn) stay in eval."""
    network.eval()
    for module in trainable_modules(network, phase):
        module.train()
    network.dropout.train()  # the head trains in every phase
    if not train_bn:
        for module in network.modules():
            if isinstance(module, BATCHNORM_TYPES):
                module.eval()
