"""Datasets and the LightningDataModule over the manifest and the resize-once cache.

Images come out of the cache as uint8 CHW tensors, augmented per sample in the loader workers on a
CPU, or read by threads into pinned memory and augmented per batch on a GPU (`batches.ImageBatches`);
the model converts and normalizes them. Frozen-prefix activations (see `training.features`) have their
own dataset that serves one cached augmented view per epoch.
"""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, default_collate

from . import rowio
from .batches import ImageBatches
from .cache import ImageCache
from .transforms import build_augmentation, to_chw


def collate_batched(batch):
    """Pass through batches a dataset's `__getitems__` already stacked; collate anything else as usual."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    return default_collate(batch)


class ImageDataset(Dataset):
    def __init__(self, cache: ImageCache, keys: list[str], labels: np.ndarray, transform=None):
        self.cache, self.keys, self.labels, self.transform = cache, keys, np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        image = to_chw(np.array(self.cache.get(self.keys[index])))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getitems__(self, indices: list[int]):
        """Without a per-sample transform, a batch is one gather from the memory map (GPU loaders)."""
        if self.transform is not None:
            return [self[i] for i in indices]
        images = self.cache.stack([self.keys[i] for i in indices])
        labels = torch.as_tensor(self.labels[np.asarray(indices)], dtype=torch.long)
        return torch.from_numpy(images).permute(0, 3, 1, 2), labels


class ActivationDataset(Dataset):
    """Cached activations of shape (views, N, ...): epoch e reads view e % views.

    A memory map of a whole `.npy` file (what `compute_activations` returns) is read with positional
    reads (`rowio`), not through the map: every page touched through a map stays counted in the
    process's RSS until it is unmapped, so an epoch over 100k cached rows grew RSS by the whole view.
    """

    def __init__(self, activations: np.ndarray, labels: np.ndarray):
        self.activations, self.labels = activations, torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.view = 0
        self._file, self._fd = rowio.npy_file(activations), None

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.activations.shape[0]

    def __len__(self) -> int:
        return self.activations.shape[1]

    def __getitem__(self, index: int):
        batch, labels = self.__getitems__([index])
        return batch[0], labels[0]

    def __getitems__(self, indices: list[int]):
        order = np.sort(np.asarray(indices, dtype=np.int64))  # sorted reads are sequential in the file
        if self._file is None:
            batch = np.ascontiguousarray(self.activations[self.view, order])
        else:
            if self._fd is None:
                self._fd = os.open(self._file, os.O_RDONLY)
            batch = rowio.read_rows(self.activations, self.view * len(self) + order, lead=2, fd=self._fd)
        return torch.from_numpy(batch), self.labels[order]

    def __getstate__(self):  # a loader worker reopens the file: no copy of the cache, no shared descriptor
        return {**self.__dict__, "_fd": None, **({"activations": None} if self._file else {})}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._file:
            self.activations = np.load(self._file, mmap_mode="r")

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalized to mean 1 (scikit-learn's 'balanced' rule)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, num_classes: int, seed: int = 0) -> WeightedRandomSampler:
    per_sample = class_weights(labels, num_classes).numpy()[labels]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(per_sample, num_samples=len(labels), replacement=True, generator=generator)


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders over manifest rows, reading from the resize-once cache."""

    def __init__(self, rows: list[dict], keys: list[str], classes: list[str], cache: ImageCache,
                 batch_size: int = 64, augment: str = "standard", balance: str = "none",
                 workers: int | None = None, seed: int = 0, device_augment: bool = False):
        super().__init__()
        self.device_augment = device_augment  # True: the model augments batches on the GPU instead
        self.cache, self.classes, self.batch_size = cache, classes, batch_size
        self.augment, self.balance, self.seed = augment, balance, seed
        self.workers = default_workers() if workers is None else workers
        index = {name: i for i, name in enumerate(classes)}
        self.keys = keys  # every row's cache key, in the order of `rows`
        self.parts, self.positions = {}, {}  # per split: (keys, labels), and the rows' positions in `rows`
        for part in ("train", "val", "test"):
            chosen = [i for i, row in enumerate(rows) if row["split"] == part]
            self.positions[part] = np.array(chosen, dtype=np.int64)
            self.parts[part] = ([keys[i] for i in chosen], np.array([index[rows[i]["label"]] for i in chosen],
                                                                    dtype=np.int64))

    def labels(self, part: str) -> np.ndarray:
        return self.parts[part][1]

    def dataset(self, part: str, augment: bool | None = None) -> ImageDataset:
        keys, labels = self.parts[part]
        use = (part == "train" and not self.device_augment) if augment is None else augment
        transform = build_augmentation(self.augment, self.cache.size) if use else None
        return ImageDataset(self.cache, keys, labels, transform)

    def _loader(self, part: str, shuffle: bool, sampler=None) -> DataLoader | ImageBatches:
        if self.device_augment:  # images as cached, augmented on the GPU: threads read into pinned memory
            return ImageBatches(self.dataset(part), self.batch_size, shuffle=shuffle, seed=self.seed, sampler=sampler,
                                threads=self.workers)
        return DataLoader(self.dataset(part), batch_size=self.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=self.workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.workers > 0, drop_last=False, collate_fn=collate_batched,
                          prefetch_factor=4 if self.workers > 0 else None)

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.balance == "sampler":
            sampler = balanced_sampler(self.labels("train"), len(self.classes), self.seed)
        return self._loader("train", shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
