"""Augmentation recipes by name, built from torchvision's v2 transforms.

They run on uint8 CHW tensors taken from the resize-once cache (already at the training size), so the
same recipe works per sample in a DataLoader worker or on a whole batch on the GPU. Normalization
(mean/std) is not here: it lives inside the model (`models.network.Network`) and travels with it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

RECIPES: dict[str, Callable[[int], v2.Transform]] = {}


def register_recipe(name: str):
    def decorate(builder: Callable[[int], v2.Transform]):
        if name in RECIPES:
            raise ValueError(f"augmentation recipe {name!r} registered twice")
        RECIPES[name] = builder
        return builder
    return decorate


@register_recipe("none")
def _none(size: int) -> v2.Transform:
    return v2.Identity()


@register_recipe("light")
def _light(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


@register_recipe("standard")
def _standard(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ])


@register_recipe("strong")
def _strong(size: int) -> v2.Transform:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.TrivialAugmentWide(),
        v2.RandomErasing(p=0.25, value=0),
    ])


def build_augmentation(name: str, size: int) -> v2.Transform:
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name](size)


def to_chw(image_hwc) -> torch.Tensor:
    """numpy HWC uint8 -> torch CHW uint8 (no copy of the pixel data when possible)."""
    return torch.from_numpy(image_hwc).permute(2, 0, 1)
