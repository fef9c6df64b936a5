"""Frozen-prefix caching: run the frozen layers once per image, train only the tail.

Layers that are frozen during a phase compute the same output every epoch, so that output is computed
once per (image, augmented view) and stored as float16 in memory-mapped `.npy` files on disk (RAM
use stays bounded by the batch). Stage 1 then trains the head on pooled features and stage 2 trains
the last stages on the activations entering them: exact, because nothing before the cut ever
receives a gradient and BatchNorm there runs in inference mode.

All boundaries needed by a run are captured in one forward pass per view: the prefix of a deeper
phase is a prefix of a shallower phase's prefix, and every prefix keeps its pretrained weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import operator
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..data import rowio
from ..data.batches import ImageBatches, pad_batch
from ..data.datamodule import ImageDataset, collate_batched
from ..data.transforms import splitmix64
from ..models import backbones
from ..models.network import Network
from ..errors import EffituneWarning

POOLED = "pooled"
SEEDING = 2  # how augmented views are seeded (`view_seed`); caches seeded otherwise are computed again


def boundary_name(depth: int | None) -> str:
    return POOLED if depth is None else f"depth{depth}"


@torch.inference_mode()
def _capture(network: Network, images: torch.Tensor, depths: list[int]) -> dict[str, torch.Tensor]:
    backbone = network.backbone
    stages = backbones.num_stages(backbone)
    h = backbones.stem_forward(backbone, network.normalize(images))
    out: dict[str, torch.Tensor] = {}
    for i in range(stages):
        if stages - i in depths:
            out[boundary_name(stages - i)] = h
        h = backbone.blocks[i](h)
    out[POOLED] = backbones.tail_forward(backbone, h, 0, pre_logits=True)
    return out


class _CaptureModule(torch.nn.Module):
    """`_capture` as a module with a fixed output order, for export to ONNX."""

    def __init__(self, network: Network, depths: list[int]):
        super().__init__()
        self.network, self.depths = network, depths
        self.names = [POOLED] + [boundary_name(d) for d in depths]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured = _capture.__wrapped__(self.network, images, self.depths)
        return tuple(captured[name] for name in self.names)


def onnx_capture(network: Network, depths: list[int], size: int, spin: bool = True):
    """The frozen forward as an ONNX Runtime session (several times faster than PyTorch eager on a CPU).

    Returns a function uint8 NCHW tensor -> {name: float32 array}, or None when ONNX Runtime is not
    installed or the export fails (PyTorch eager is then used; both give the same activations).
    `spin`: let idle ONNX Runtime threads busy-wait for work (its default). Off when loader workers
    augment on the same cores: the spinning takes their time (96 px, one worker on 2 cores: 1.14x).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from ..runtime.graph import torchscript_graph

    module = _CaptureModule(network.cpu().eval(), depths).eval()
    try:
        graph = torchscript_graph(module, (torch.rand(2, 3, size, size),), ["images"], module.names, opset=17)
        options = ort.SessionOptions()
        options.intra_op_num_threads = distributed.cores_per_process()  # all cores, shared among the ranks here
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - an exporter gap must not stop training: eager still works
        warnings.warn(f"frozen layers run in PyTorch eager (ONNX export failed: {type(error).__name__}: {error})", EffituneWarning)
        return None

    def run(images: torch.Tensor) -> dict[str, np.ndarray]:
        batch = images.numpy().astype(np.float32) / np.float32(255)
        return dict(zip(module.names, session.run(None, {"images": batch})))
    try:
        difference = _largest_difference(run, module, size)
    except Exception as error:  # noqa: BLE001 - as above: eager still works
        warnings.warn(f"frozen layers run in PyTorch eager (ONNX Runtime failed: {type(error).__name__}: {error})", EffituneWarning)
        return None
    if difference > 1e-3:
        warnings.warn(f"frozen layers run in PyTorch eager (ONNX Runtime differs from it by up to {difference:.1e})", EffituneWarning)
        return None
    return run


def _largest_difference(run, module: _CaptureModule, size: int) -> float:
    """Largest |ONNX Runtime - PyTorch| over the captured outputs of 4 random images, relative to their scale."""
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = run(images)
    with torch.inference_mode():
        expected = module(images.float() / 255)
    return max(float(np.abs(got[name] - want.numpy()).max() / max(1.0, float(want.abs().max())))
               for name, want in zip(module.names, expected))


def images_fingerprint(keys: list[str]) -> str:
    """Which images, in which order: row i of a cache belongs to the i-th image, whoever reuses it."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


def _covers(stored: dict, wanted: dict) -> bool:
    """An earlier result serves when it has the same images and views and at least the wanted cuts."""
    same = all(stored.get(key) == wanted[key] for key in ("n", "views", "size", "images", "seeding"))
    return same and set(wanted["depths"]) <= set(stored.get("depths", []))


def compute_activations(network: Network, dataset: ImageDataset, depths: list[int], folder: Path,
                        views: int = 1, batch_size: int = 128, device: str = "cpu",
                        workers: int = 0, progress=None, batch_augment=None,
                        engine: str = "auto", sharded: bool = False) -> dict[str, np.ndarray]:
    """Write `<folder>/<boundary>.npy` (views, N, ...) float16 for pooled features and each depth.

    View 0 is the image as evaluated; views 1.. apply `dataset.transform` (the augmentation recipe,
    per sample in loader workers) or, when given, `batch_augment` on the device (GPU), seeded per
    (image, view): the cache does not depend on batch size, loader workers or the number of ranks.
    Reuses a complete earlier result with the same signature (resume, repeated runs).
    `engine`: "auto" runs the frozen layers with ONNX Runtime on a CPU when it is installed,
    PyTorch otherwise (and always on a GPU: bf16 + channels_last there); "torch" forces PyTorch.
    `sharded`: every rank of a distributed run calls this together; rank r computes the r-th
    contiguous block of images into files of its own (`<boundary>.part<r>.npy`, so no two processes
    write one file, even on a shared file system) and every rank reads all blocks as one array.
    """
    folder = Path(folder)
    names = [POOLED] + [boundary_name(d) for d in depths]
    signature = {"n": len(dataset), "views": views, "depths": sorted(depths), "size": dataset.cache.size,
                 "images": images_fingerprint(dataset.keys), "seeding": SEEDING}
    meta_path = folder / "activations.json"
    stored = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if sharded:
        stored = distributed.from_main(stored)  # one decision for every rank
    if stored is not None and _covers(stored, signature):
        return _open_blocks(folder, names, stored)
    rank, world = (distributed.rank(), distributed.world_size()) if sharded else (0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        meta_path.unlink(missing_ok=True)
    start, stop = distributed.shard_range(len(dataset), rank, world)
    suffix = f".part{rank}" if world > 1 else ""
    _compute_block(network, dataset, depths, folder, range(start, stop), suffix, views, batch_size, device,
                   workers, progress, batch_augment, engine)
    if sharded:
        distributed.note(f"features/{folder.name}", stop - start)
    blocks = distributed.each_rank(lambda: [start, stop, suffix]) if sharded else [[0, len(dataset), ""]]
    meta = {**signature, "blocks": [block for block in blocks if block[1] > block[0]]}
    if rank == 0:
        meta_path.write_text(json.dumps(meta))  # the others need not wait: they know the blocks already
    return _open_blocks(folder, names, meta)


def _compute_block(network: Network, dataset: ImageDataset, depths: list[int], folder: Path, rows: range,
                   suffix: str, views: int, batch_size: int, device: str, workers: int, progress,
                   batch_augment, engine: str) -> None:
    """Activations of images `rows` into `<folder>/<boundary><suffix>.npy`, each renamed into place when whole."""
    if not len(rows):
        return
    use_onnx = engine == "auto" and device == "cpu"
    onnx_run = onnx_capture(network, depths, dataset.cache.size, spin=workers == 0) if use_onnx else None
    network = network.to(device).eval().to(memory_format=torch.channels_last)
    try:
        _write_views(network, dataset, depths, folder, rows, suffix, views, batch_size, device, workers, progress,
                     batch_augment, onnx_run)
    finally:
        network.to(memory_format=torch.contiguous_format)  # the format training and export start from


def _write_views(network: Network, dataset: ImageDataset, depths: list[int], folder: Path, rows: range,
                 suffix: str, views: int, batch_size: int, device: str, workers: int, progress, batch_augment,
                 onnx_run) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    arrays: dict[str, np.ndarray] = {}
    temporaries: dict[str, Path] = {}
    total, done = views * len(rows), 0
    writer = _RowWriter()
    try:
        for offset, images, seeds in _pass_batches(dataset, rows, views, batch_augment is not None, batch_size,
                                                   device, workers):
            images, n = images.to(device, non_blocking=True), len(images)
            if seeds is not None:
                images = batch_augment(images, seeds=seeds)
            if onnx_run is not None:
                captured = {k: torch.from_numpy(v) for k, v in onnx_run(images).items()}
            else:
                images = pad_batch(images, batch_size)  # one input shape per process (GPU: see pad_batch)
                with autocast:
                    captured = _capture(network, images.contiguous(memory_format=torch.channels_last), depths)
                captured = {name: tensor[:n] for name, tensor in captured.items()}
            for name, tensor in captured.items():
                if name not in arrays:
                    temporaries[name] = folder / f"{name}{suffix}.{uuid.uuid4().hex[:8]}.tmp.npy"
                    arrays[name] = np.lib.format.open_memmap(
                        temporaries[name], mode="w+", dtype=np.float16,
                        shape=(views, len(rows), *tensor.shape[1:]))
                writer.put(arrays[name], offset, tensor)  # row `offset` of the (views * images) rows
            done += n
            if progress is not None:
                progress(done, total)
        writer.close()  # raises a failed write: cleaned up below like any other error
    except BaseException:
        writer.abandon()  # the error that stopped the loop is the one to report
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise
    for name, array in arrays.items():
        rowio.flush(array)
        temporaries[name].replace(folder / f"{name}{suffix}.npy")


def _pass_batches(dataset: ImageDataset, rows: range, views: int, on_device: bool, batch_size: int, device: str,
                  workers: int):
    """(offset, uint8 batch, seeds or None) for every view of images `rows`, in row order.

    `offset` is the batch's first row in the (views * images) rows of the cache. Images as cached
    (view 0, and views augmented later on the device, which get their per-image `seeds`) come from
    threads reading into pinned memory (`ImageBatches`). Views augmented per sample on a CPU come from
    ONE loader of worker processes over all of them, started before the first forward: workers forked
    after ONNX Runtime has filled its memory arena make every arena page copy-on-write, and at 224 px
    the page faults that follow cost more than the forward itself (measured: 4-5x slower per view).
    """
    n = len(rows)
    augmented = None
    if views > 1 and not on_device:
        source = _SeededViews(dataset, rows, range(1, views), dataset.transform)
        augmented = iter(torch.utils.data.DataLoader(  # iter() forks the workers now, see above
            source, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_batched,
            prefetch_factor=4 if workers else None))
    try:
        plain_views = range(views) if on_device else range(1)
        part = ImageDataset(dataset.cache, [dataset.keys[i] for i in rows], dataset.labels[rows.start:rows.stop])
        for view in plain_views:
            first = 0  # of the images in `rows`
            for images, _ in ImageBatches(part, batch_size, threads=workers, pin=device.startswith("cuda"),
                                          rank=0, world=1):
                seeds = [view_seed(view, i) for i in rows[first:first + len(images)]] if view > 0 else None
                yield view * n + first, images, seeds
                first += len(images)
        if augmented is not None:
            offset = n
            for images, _ in augmented:
                yield offset, images, None
                offset += len(images)
    finally:  # an error (or Ctrl-C) anywhere: stop the workers now, not when the traceback is dropped
        shutdown = getattr(augmented, "_shutdown_workers", None)  # DataLoader's own clean stop
        if shutdown is not None:
            shutdown()


class _RowWriter:
    """Writes activation rows to their files in a thread while the device computes the next batch.

    From a GPU each batch is copied as float16 (half the bytes, no conversion on the CPU) into pinned
    memory without blocking; the thread waits for that copy, then writes with positional I/O (rows
    written through a memory map would stay in this process's RSS) and syncs them, so the disk works
    while the device computes instead of in one fsync at the end. At most `depth` writes wait.
    """

    def __init__(self, depth: int = 8):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="effitune-features")
        self.pending: deque = deque()
        self.depth = depth

    def put(self, array: np.ndarray, start: int, tensor: torch.Tensor) -> None:
        half = tensor.to(torch.float16)
        event = None
        if half.is_cuda:
            host = torch.empty(half.shape, dtype=torch.float16, pin_memory=True)
            host.copy_(half, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = half
        self.pending.append(self.pool.submit(self._write, array, start, host, event))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()  # raises a failed write here (disk full, ...)

    @staticmethod
    def _write(array: np.ndarray, start: int, host: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        rowio.write_rows(array, start, host.numpy(), lead=2, sync=True)  # disk writes overlap the compute

    def close(self) -> None:
        """Wait for every write; raise the first that failed."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abandon(self) -> None:
        """Stop after an error elsewhere: cancel the queued writes, keep their errors out of the way."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def view_seed(view: int, index: int) -> int:
    """The augmentation seed of image `index` in view `view`: the same in any batch, worker or rank.

    A SplitMix64 hash of (view, index) cut to 32 bits: torch's CPU generator keeps only the low 32 bits
    of a seed, so a plain `view * 2**32 + index` gave every view of an image the same augmentation.
    """
    return int(splitmix64(np.array([(1000 + view) << 32 | index], dtype=np.uint64))[0] >> np.uint64(32))


class _SeededViews(torch.utils.data.Dataset):
    """Images `rows` of an ImageDataset in each of `views` in turn (item j: view views[j // len(rows)],
    image rows[j % len(rows)]), each augmented by `transform` under its own `view_seed`."""

    def __init__(self, dataset: ImageDataset, rows: range, views: range, transform):
        self.base, self.rows, self.views = copy.copy(dataset), rows, views
        self.base.transform = transform

    def __len__(self) -> int:
        return len(self.rows) * len(self.views)

    def __getitem__(self, j: int):
        view, index = self.views[j // len(self.rows)], self.rows[j % len(self.rows)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(view, index))
            return self.base[index]


def _open_blocks(folder: Path, names: list[str], meta: dict) -> dict[str, np.ndarray]:
    blocks = meta.get("blocks", [[0, meta["n"], ""]])  # results written before sharding: one file each
    out = {}
    for name in names:
        parts = [(start, stop, np.load(folder / f"{name}{suffix}.npy", mmap_mode="r"))
                 for start, stop, suffix in blocks]
        out[name] = parts[0][2] if len(parts) == 1 else RowBlocks(parts)
    return out


class RowBlocks:
    """Row blocks in several files read as one (views, N, ...) array: `blocks[view]`, `blocks[view, rows]`.

    Rows of a whole-file memory map are read with positional file I/O (`rowio`), as ActivationDataset
    reads a single file: pages touched through a map would stay in the process's RSS.
    """

    def __init__(self, parts: list[tuple[int, int, np.ndarray]]):
        self.parts = sorted(parts, key=lambda part: part[0])
        first = self.parts[0][2]
        self.shape = (first.shape[0], self.parts[-1][1], *first.shape[2:])
        self.dtype, self.ndim = first.dtype, len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        view, rows = key if isinstance(key, tuple) else (key, slice(None))
        rows = np.arange(self.shape[1])[rows]
        out = np.empty((*np.shape(rows), *self.shape[2:]), self.dtype)
        for start, stop, array in self.parts:
            inside = (rows >= start) & (rows < stop)
            if np.any(inside):
                local = rows[inside] - start
                if isinstance(view, (int, np.integer)):  # (view, row) -> row view * n + row of the file
                    view_index = operator.index(view) % self.shape[0]  # -1: the last view, as numpy reads it
                    out[inside] = rowio.read_rows(array, view_index * array.shape[1] + local, lead=2)
                else:
                    out[inside] = array[view, local]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = np.stack([self[view] for view in range(self.shape[0])])
        return whole if dtype is None else whole.astype(dtype)
