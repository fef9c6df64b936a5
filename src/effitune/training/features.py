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

import json
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..data.datamodule import ImageDataset, collate_batched
from ..models import backbones
from ..models.network import Network

POOLED = "pooled"


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


def onnx_capture(network: Network, depths: list[int], size: int, folder: Path):
    """The frozen forward as an ONNX Runtime session (several times faster than PyTorch eager on a CPU).

    Returns a function uint8 NCHW tensor -> {name: float32 array}, or None when ONNX Runtime is not
    installed or the export fails (PyTorch eager is then used; both give the same activations).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from ..predict import available_cores

    module = _CaptureModule(network.cpu().eval(), depths)
    path = folder / f"frozen-{uuid.uuid4().hex[:8]}.onnx"
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter: 3 s here, dynamo ~8 s
            torch.onnx.export(module, (torch.rand(2, 3, size, size),), str(path), input_names=["images"],
                              output_names=module.names, opset_version=17, dynamo=False,
                              dynamic_axes={name: {0: "batch"} for name in ["images", *module.names]})
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cores()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - an exporter gap must not stop training: eager still works
        warnings.warn(f"frozen layers run in PyTorch eager (ONNX export failed: {type(error).__name__}: {error})")
        return None
    finally:
        path.unlink(missing_ok=True)

    def run(images: torch.Tensor) -> dict[str, np.ndarray]:
        batch = images.numpy().astype(np.float32) / np.float32(255)
        return dict(zip(module.names, session.run(None, {"images": batch})))
    return run


def compute_activations(network: Network, dataset: ImageDataset, depths: list[int], folder: Path,
                        views: int = 1, batch_size: int = 128, device: str = "cpu",
                        workers: int = 0, progress=None, batch_augment=None,
                        engine: str = "auto") -> dict[str, np.ndarray]:
    """Write `<folder>/<boundary>.npy` (views, N, ...) float16 for pooled features and each depth.

    View 0 is the image as evaluated; views 1.. apply `dataset.transform` (the augmentation recipe,
    per sample in loader workers) or, when given, `batch_augment` on the device (GPU).
    Reuses a complete earlier result with the same signature (resume, repeated runs).
    `engine`: "auto" runs the frozen layers with ONNX Runtime on a CPU when it is installed,
    PyTorch otherwise (and always on a GPU: bf16 + channels_last there); "torch" forces PyTorch.
    """
    folder = Path(folder)
    names = [POOLED] + [boundary_name(d) for d in depths]
    signature = {"n": len(dataset), "views": views, "depths": sorted(depths), "size": dataset.cache.size}
    meta_path = folder / "activations.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == signature:
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    use_onnx = engine == "auto" and device == "cpu"
    onnx_run = onnx_capture(network, depths, dataset.cache.size, folder) if use_onnx else None
    network = network.to(device).eval().to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    arrays: dict[str, np.ndarray] = {}
    temporaries: dict[str, Path] = {}
    augment = dataset.transform
    total, done = views * len(dataset), 0
    for view in range(views):
        dataset.transform = augment if view > 0 and batch_augment is None else None
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             pin_memory=device.startswith("cuda"), collate_fn=collate_batched,
                                             prefetch_factor=4 if workers else None)
        start = 0
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(1000 + view)  # each view's augmentation is reproducible
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if view > 0 and batch_augment is not None:
                images = batch_augment(images)
            if onnx_run is not None:
                captured = {k: torch.from_numpy(v) for k, v in onnx_run(images).items()}
            else:
                with autocast:
                    captured = _capture(network, images.contiguous(memory_format=torch.channels_last), depths)
            for name, tensor in captured.items():
                if name not in arrays:
                    temporaries[name] = folder / f"{name}.{uuid.uuid4().hex[:8]}.tmp.npy"
                    arrays[name] = np.lib.format.open_memmap(
                        temporaries[name], mode="w+", dtype=np.float16, shape=(views, len(dataset), *tensor.shape[1:]))
                # float16 on the device: half the bytes to copy back, no conversion on the CPU
                arrays[name][view, start:start + len(images)] = tensor.to(torch.float16).cpu().numpy()
            start += len(images)
            done += len(images)
            if progress is not None:
                progress(done, total)
        torch.random.set_rng_state(generator_state)
    dataset.transform = augment
    for name, array in arrays.items():
        array.flush()
        temporaries[name].replace(folder / f"{name}.npy")
    meta_path.write_text(json.dumps(signature))
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
