"""Backbones by name, their ImageNet weights, and the prefix/tail split used in stage 2."""
from .backbones import (
    BackboneInfo,
    backbone_info,
    backbone_names,
    create_backbone,
    feature_dim,
    head_module,
    list_backbones,
    num_stages,
    pooled_features,
    prefix_forward,
    register_backbone,
    stem_forward,
    tail_forward,
    tail_modules,
)
from .pretrained import (
    convert_efficientnet_pytorch,
    load_pretrained,
    load_weights_file,
    packaged_weights_path,
)

__all__ = [
    "BackboneInfo",
    "backbone_info",
    "backbone_names",
    "convert_efficientnet_pytorch",
    "create_backbone",
    "feature_dim",
    "head_module",
    "list_backbones",
    "load_pretrained",
    "load_weights_file",
    "num_stages",
    "packaged_weights_path",
    "pooled_features",
    "prefix_forward",
    "register_backbone",
    "stem_forward",
    "tail_forward",
    "tail_modules",
]
