"""Batches of cached uint8 images read by threads straight into pinned memory, for a GPU.

A DataLoader with worker processes moves every 224-px image (150 KB) three times before the GPU sees
it: the worker's gather, the hand-off through shared memory and the pin-memory thread's copy; on a
16-core H200 machine that capped the resize-once cache at ~7k images/s, a third of what lite0's frozen
layers compute (docs/benchmarks.md). Here each batch is one set of positional reads from the cache's
files (they release the GIL, so a few threads read in parallel) into a page-locked buffer that the GPU
copies asynchronously. Deliberately not `torchdata.nodes` (threads too, but a pin-memory step that
copies every batch once more, and one more dependency).

Only for images without a per-sample transform: augmentation then runs on whole batches on the device
(`transforms.BatchAugment`). Shuffling is seeded per epoch; under several processes every rank takes
its own share of each epoch, padded to the same number of batches as DistributedSampler does (DDP
needs every rank to step the same number of times).
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import distributed


class ImageBatches:
    """`for images, labels in ImageBatches(dataset, 256, shuffle=True)`: uint8 NCHW (channels_last) + int64.

    `sampler`: drawn anew every epoch (e.g. a WeightedRandomSampler) instead of a permutation;
    `threads` read batches in parallel, `prefetch` batches are read ahead of the consumer.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = False, seed: int = 0, sampler=None,
                 threads: int = 4, prefetch: int = 6, pin: bool | None = None, rank: int | None = None,
                 world: int | None = None):
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("ImageBatches reads images as cached: augment them on the device (BatchAugment)")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.draws = sampler  # not `.sampler`: Lightning would take this for a DataLoader and look for more
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        drawn = len(self.draws) if self.draws is not None else len(self.dataset)
        return math.ceil(drawn / self.world)

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.batch_size)

    def order(self) -> np.ndarray:
        """This rank's indices for the current epoch."""
        if self.draws is not None:
            generator = getattr(self.draws, "generator", None)
            if generator is not None:  # the draws of epoch e, whatever ran before (a resumed run)
                generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            drawn = np.fromiter(iter(self.draws), dtype=np.int64)
        elif self.shuffle:
            drawn = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
        else:
            drawn = np.arange(len(self.dataset))
        padded = np.resize(drawn, self._per_rank() * self.world)  # repeats the first indices, as DDP's sampler
        return padded[self.rank::self.world]

    def __iter__(self):
        """One epoch. Lightning sets the epoch only on DataLoaders: a training run passes this loader to
        `callbacks.SetEpoch`, so the order follows the trainer's epoch (also when a run resumes)."""
        order = self.order()
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="effitune-batches")
        try:
            pending = deque(pool.submit(self._read, chunk) for chunk in chunks[:self.prefetch])
            for chunk in chunks[self.prefetch:]:
                yield pending.popleft().result()
                pending.append(pool.submit(self._read, chunk))
            while pending:
                yield pending.popleft().result()
        finally:  # also when the consumer stops early: no reads left queued, no pinned buffers held
            pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        dataset, size = self.dataset, self.dataset.cache.size
        buffer = torch.empty((len(indices), size, size, 3), dtype=torch.uint8, pin_memory=self.pin)
        dataset.cache.stack([dataset.keys[i] for i in indices.tolist()], out=buffer.numpy())
        labels = torch.as_tensor(dataset.labels[indices], dtype=torch.long)
        return buffer.permute(0, 3, 1, 2), labels  # NCHW view of NHWC memory: channels_last, no copy


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with its last row repeated up to `size` rows (unchanged when it has as many already).

    On a GPU every new input shape costs seconds before its first result (most likely cuDNN planning
    each layer for that shape): on an H200, ~2 s per new batch size for lite0's forward at 224 px,
    against 0.7 s for 14k images once the shape was seen. A partial last batch would add a new shape
    to each pass; padded, it reuses the full batches'. Only for layers without batch statistics.
    """
    if len(x) >= size or not len(x):
        return x
    padded = torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        padded = padded.contiguous(memory_format=torch.channels_last)  # the full batches' layout (and plans)
    return padded
