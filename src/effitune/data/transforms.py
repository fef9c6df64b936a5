"""Augmentation recipes by name, built from torchvision's v2 transforms.

They run on uint8 CHW tensors taken from the resize-once cache (already at the training size), so the
same recipe works per sample in a DataLoader worker or on a whole batch on the GPU. Normalization
(mean/std) is not here: it lives inside the model (`models.network.Network`) and travels with it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
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


# Per-sample random crop scale range and colour jitter of each recipe, for the batched GPU version.
BATCH_RECIPES = {"none": None, "light": (0.8, 0.0), "standard": (0.6, 0.2), "strong": (0.35, 0.3)}


class BatchAugment(torch.nn.Module):
    """Per-sample random-resized-crop + horizontal flip + brightness/contrast jitter on a whole batch.

    torchvision's v2 transforms draw one set of random parameters per call, i.e. per batch; this draws
    them per image and runs as a handful of batched kernels (roi_align for the crops), so augmentation
    keeps up with a GPU instead of starving it from CPU workers. uint8 NCHW in, uint8 NCHW out.
    """

    def __init__(self, size: int, min_scale: float = 0.6, jitter: float = 0.2, max_aspect: float = 4 / 3):
        super().__init__()
        self.size, self.min_scale, self.jitter = size, min_scale, jitter
        self.max_log_ratio = math.log(max_aspect)

    @classmethod
    def from_recipe(cls, name: str, size: int) -> "BatchAugment | None":
        params = BATCH_RECIPES.get(name)
        return None if params is None else cls(size, *params)

    def forward(self, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """`seeds`: one per image, so an image's augmentation does not depend on its batch (cached views)."""
        from torchvision.ops import roi_align

        n, _, height, width = images.shape
        device = images.device
        u = self._uniforms(n, device, seeds)
        area = self.min_scale + (1 - self.min_scale) * u[:, 0]
        log_ratio = (2 * u[:, 1] - 1) * self.max_log_ratio
        crop_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0) * width
        crop_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0) * height
        x0 = u[:, 2] * (width - crop_w)
        y0 = u[:, 3] * (height - crop_h)
        boxes = torch.stack([torch.arange(n, device=device, dtype=torch.float32), x0, y0, x0 + crop_w, y0 + crop_h], 1)
        out = roi_align(images.float(), boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=2,
                        aligned=True)
        flip = u[:, 4] < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        if self.jitter:
            brightness = (1 + self.jitter * (2 * u[:, 5] - 1)).view(n, 1, 1, 1)
            contrast = (1 + self.jitter * (2 * u[:, 6] - 1)).view(n, 1, 1, 1)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * contrast + mean) * brightness
        return out.clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _uniforms(n: int, device, seeds: list[int] | None) -> torch.Tensor:
        """(n, 7) uniform numbers: from the device's generator, or a counter-based hash of each seed."""
        if seeds is None:
            return torch.rand(n, 7, device=device)
        return torch.from_numpy(seeded_uniforms(seeds, 7)).to(device, non_blocking=True)


def seeded_uniforms(seeds, count: int) -> np.ndarray:
    """(len(seeds), count) float32 numbers in [0, 1), a pure function of each seed (SplitMix64 of seed, k).

    One vectorized hash for the whole batch: a generator per seed cost 1.2 ms per batch of 256 on the
    main thread of a GPU caching pass. SplitMix64's output passes BigCrush; only the top 24 bits are used.
    """
    state = np.asarray(seeds, dtype=np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
    return (splitmix64(state) >> np.uint64(40)).astype(np.float32) / np.float32(2 ** 24)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 of each uint64 value (its output passes BigCrush): distinct inputs, unrelated outputs."""
    state = values * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)  # wraps modulo 2**64
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state ^ (state >> np.uint64(31))


def to_chw(image_hwc) -> torch.Tensor:
    """numpy HWC uint8 -> torch CHW uint8 (no copy of the pixel data when possible)."""
    return torch.from_numpy(image_hwc).permute(2, 0, 1)
