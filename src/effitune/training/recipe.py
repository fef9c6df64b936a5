"""The recipe sized to the hardware and the data: how deep `unfreeze auto` goes, with what BatchNorm
and image size. The one place this policy is written (docs/architecture.md, "The recipe").

- **A CPU** (2 cores measured): the frozen prefix is cached once and each deeper stage costs about
  twice the last (the demo: depth 3 is 170 s of a 7-minute run), so `auto` climbs the ladder
  depth 1, 2, 3 while validation improves (`max_unfreeze` 3, BatchNorm frozen), at ~3x the images'
  size (96 px for 28-px images).
- **A GPU with data enough** (`FULL_FINETUNE_IMAGES` training images or more): the whole network
  trains right after stage 1, BatchNorm included, for `FULL_FINETUNE_EPOCHS`: the plain full
  fine-tune that reached 0.951 on Fashion-MNIST in 96 s on an H200, where effitune's CPU ladder
  stopped at 0.934 after 71 s of phases plus their fixed costs (ANCHORS.md). Small images are
  trained at ~4.5x their size there (128 px for 28-px ones: 0.918 vs 0.894 at 64 px, ANCHORS).
- **A GPU with little data**: the ladder again, as deep as the network (then all layers), BatchNorm
  frozen: too few images to re-estimate its statistics.
- **Any device, with a time budget** (`train.time_budget_min`): a deeper phase starts only when its
  cost, predicted from the phases measured so far, fits in what is left.

Every choice here yields to an explicit setting: `unfreeze N|all`, `max_unfreeze`, `train_bn`,
`image_size`, `stage2.epochs`.
"""
from __future__ import annotations

import math

FULL_FINETUNE_IMAGES = 10_000  # training images from which a GPU run fine-tunes everything, BN included
FULL_FINETUNE_EPOCHS = 15  # the plain loop's epochs for the full fine-tune (early stopping may end sooner)
CPU_MAX_UNFREEZE = 3  # the ladder's top on a CPU: each deeper stage costs ~2x the last there
SMALL_IMAGE_FACTOR = {"cpu": 3.0, "cuda": 4.5}  # training size / short side, for images under the native size
_GROWTH = (1.0, 3.0)  # bounds on how much more a deeper phase is predicted to cost than the last


def full_finetune(unfreeze: str, device: str, n_train: int) -> bool:
    """Whether `auto` goes from stage 1 straight to every layer trained (a GPU with data enough)."""
    return str(unfreeze) == "auto" and device == "cuda" and n_train >= FULL_FINETUNE_IMAGES


def max_depth(max_unfreeze: int | None, device: str, num_stages: int) -> int:
    """The deepest stage count the ladder tries: `max_unfreeze` if set, else 3 on a CPU, all on a GPU."""
    if max_unfreeze is not None:
        return max_unfreeze
    return CPU_MAX_UNFREEZE if device == "cpu" else num_stages


def auto_depths(unfreeze: str, max_unfreeze: int | None, num_stages: int, device: str, n_train: int) -> list[int]:
    """The stage-2 depths `auto` tries, in order ([-1]: every layer); other settings are taken as given."""
    if str(unfreeze) != "auto":
        return fixed_depths(unfreeze, num_stages)
    if full_finetune(unfreeze, device, n_train) and max_unfreeze is None:
        return [-1]
    top = min(max_depth(max_unfreeze, device, num_stages), num_stages)
    depths = list(range(1, top + 1))
    return [d if d < num_stages else -1 for d in depths]  # the whole feature stack: every layer, stem included


def fixed_depths(unfreeze: str | int, num_stages: int) -> list[int]:
    """`unfreeze N`: [N] ([-1] when N covers every stage); 0: [] (head only); "all": [-1]."""
    text = str(unfreeze)
    if text == "all":
        return [-1]
    depth = int(text)
    if depth == 0:
        return []
    return [-1] if depth >= num_stages else [depth]


def train_bn(setting: bool | None, depth: int | None, n_train: int) -> bool:
    """BatchNorm trains when asked; by default only when every layer trains on data enough for its statistics."""
    if setting is not None:
        return setting
    return depth is not None and depth < 0 and n_train >= FULL_FINETUNE_IMAGES


def stage2_epochs(default: int, depths: list[int], n_train: int) -> int:
    """A full fine-tune on data enough gets the plain loop's epochs; the ladder's phases keep the default."""
    return max(default, FULL_FINETUNE_EPOCHS) if depths == [-1] and n_train >= FULL_FINETUNE_IMAGES else default


def small_image_size(short_side: float, native: int, device: str) -> int:
    """Training size for images smaller than the backbone's native size: a multiple of 32, >= 96."""
    factor = SMALL_IMAGE_FACTOR["cuda" if device == "cuda" else "cpu"]
    return int(min(native, max(96, math.ceil(factor * short_side / 32) * 32)))


def predicted_seconds(done: list[float]) -> float | None:
    """The next deeper phase's cost from the measured ones (oldest first): the last times its growth."""
    if not done:
        return None
    if len(done) == 1 or done[-2] <= 0:
        return done[-1] * 2.0
    growth = min(max(done[-1] / done[-2], _GROWTH[0]), _GROWTH[1])
    return done[-1] * growth
