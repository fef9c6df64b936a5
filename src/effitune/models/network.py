"""The deployable network: normalization + a timm backbone with a new head.

Input is float32 RGB in [0, 1], NCHW, already resized to the bundle's size. Mean/std live here as
buffers, so a bundle (and its ONNX export) cannot be fed inputs normalized the wrong way.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backbones


class Network(nn.Module):
    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        # The head's dropout lives here, as a module of its own: timm applies its `drop_rate` only while the
        # backbone's root module is in train mode, which a partly frozen network never is (set_train_mode).
        self.dropout = nn.Dropout(getattr(backbone, "drop_rate", 0.0))
        backbone.drop_rate = 0.0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # `prefix(x, frozen_depth)` is what training never changed (the last `frozen_depth` stages trained):
        # its pooled output joins the features the unknown-image scores read. None: pooled features only.
        self.frozen_depth: int | None = None

    @property
    def num_stages(self) -> int:
        return backbones.num_stages(self.backbone)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (what the head sees)."""
        return backbones.pooled_features(self.backbone, self.normalize(x))

    def embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, [pooled features | pooled frozen-prefix output]) in one pass.

        The second is what predictors return as "features": the unknown-image scores read both parts
        (`ood.knn-frozen`), everything else the pooled part.
        """
        if self.frozen_depth is None:
            features = self.features(x)
            return features, features
        h = self.prefix(x, self.frozen_depth)
        features = backbones.tail_forward(self.backbone, h, self.frozen_depth, pre_logits=True)
        return features, torch.cat([features, h.mean((2, 3))], 1)

    def prefix(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Output of the layers that stay frozen when the last `depth` stages train."""
        return backbones.prefix_forward(self.backbone, self.normalize(x), depth)

    def tail(self, h: torch.Tensor, depth: int) -> torch.Tensor:
        return self.head(backbones.tail_forward(self.backbone, h, depth, pre_logits=True))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Dropout + the linear classifier, applied to pooled features (stage 1 trains only this)."""
        return self.backbone.get_classifier()(self.dropout(features))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_network(backbone: str, num_classes: int, *, weights: str | None = None, pretrained: bool = True,
                  drop_rate: float = 0.2, mean=None, std=None) -> tuple[Network, str]:
    """The one factory of networks: timm `backbone` with a fresh `num_classes` head, inside a Network.

    (network, where its weights came from). Training builds it with pretrained weights; a bundle
    (`runtime.engines.network_from_meta`) without them and with its stored `mean`/`std`, then loads its
    own. Normalization defaults to the backbone's pretrained config.
    """
    model, source = backbones.create_backbone(backbone, num_classes, weights=weights, pretrained=pretrained,
                                              drop_rate=drop_rate)
    cfg = model.pretrained_cfg
    return Network(model, tuple(mean or cfg.get("mean", IMAGENET_MEAN)), tuple(std or cfg.get("std", IMAGENET_STD))), \
        source
