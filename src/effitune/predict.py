"""Predictor: bundle -> preprocessing -> network -> top-k (+ unknown). The one place inference lives.

It needs neither the training code path nor the data: only the bundle folder. CLI `predict`,
`evaluate`, the HTTP server and the benchmarks all call it.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .bundle import read_meta, read_weights
from .data.images import IMAGE_EXTENSIONS, load_for_model
from .errors import UserError
from .models.backbones import create_backbone
from .models.network import Network


def build_network(meta: dict) -> Network:
    backbone, _ = create_backbone(meta["backbone"], len(meta["classes"]), pretrained=False)
    prep = meta["preprocessing"]
    return Network(backbone, tuple(prep["mean"]), tuple(prep["std"]))


def load_network(folder: str | Path, meta: dict | None = None) -> Network:
    meta = meta or read_meta(folder)
    network = build_network(meta)
    state = read_weights(folder)
    expected = network.state_dict()
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        detail = (f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)}, expected "
                  f"{tuple(expected[mismatched[0]].shape)}" if mismatched else f"{len(missing)} tensors missing, "
                  f"e.g. {missing[0]}")
        raise UserError(f"{folder}: weights do not fit {meta['backbone']} with {len(meta['classes'])} classes "
                        f"({detail}). The weights and effitune.json come from different models; re-train or "
                        "copy the bundle again.")
    network.load_state_dict(state, strict=True)
    return network.eval()


class TorchEngine:
    """Runs the bundle's network with PyTorch. Other engines (ONNX Runtime) offer the same `run`."""

    name = "torch"

    def __init__(self, network: Network, device: str = "cpu"):
        self.network, self.device = network.to(device).eval(), device

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), pooled features (N, D)), float32."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        features = self.network.features(batch)
        return self.network.head(features).float().cpu().numpy(), features.float().cpu().numpy()


def expand_sources(sources: Iterable[str | Path]) -> Iterator[str]:
    """Files, folders (recursive, images only, sorted) and glob patterns, in the order given."""
    for source in sources:
        text = str(source)
        if os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        yield os.path.join(root, name)
        elif any(ch in text for ch in "*?[") and not os.path.exists(text):
            yield from sorted(glob.glob(text, recursive=True))
        else:
            yield text


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """`effitune.load(bundle)` returns one. `predictor.predict(["a.jpg", "photos/"])` -> list of dicts."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.classes: list[str] = list(self.meta["classes"])
        self.size: int = int(self.meta["preprocessing"]["size"])
        self.temperature: float = float(self.meta.get("temperature") or 1.0)
        self.device = device
        self.network = load_network(self.folder, self.meta)
        self.engine = TorchEngine(self.network, device)

    def __repr__(self) -> str:
        return f"Predictor({self.folder}, {self.meta['backbone']}, {len(self.classes)} classes, {self.size}px)"

    def preprocess(self, source: str | Path | bytes) -> np.ndarray:
        """Any image file (or its bytes) -> uint8 HWC array at the bundle's size."""
        return load_for_model(source, self.size)

    def run(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, size, size, 3) -> (logits, pooled features), in batches."""
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            batch_logits, batch_features = self.engine.run(images[start:start + batch_size])
            logits.append(batch_logits)
            features.append(batch_features)
        if not logits:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(features)

    def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return self.run(images, batch_size)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images), self.temperature)

    def predict(self, sources: Iterable[str | Path | bytes], top_k: int = 5, batch_size: int = 32) -> list[dict]:
        return list(self.iter_predict(sources, top_k=top_k, batch_size=batch_size))

    def iter_predict(self, sources, top_k: int = 5, batch_size: int = 32) -> Iterator[dict]:
        """Streams results in input order; a file that fails gets an `error` entry and the rest go on."""
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        for source in _with_expansion(sources):
            label = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
            try:
                pending.append((label, self.preprocess(source), None))
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
                pending.append((label, None, _describe(error)))
            if len(pending) >= batch_size:
                yield from self._finish(pending, top_k)
                pending = []
        yield from self._finish(pending, top_k)

    def _finish(self, pending, top_k: int) -> Iterator[dict]:
        good = [image for _, image, _ in pending if image is not None]
        probabilities = iter(self.probabilities(np.stack(good)) if good else [])
        k = max(1, min(top_k, len(self.classes)))
        for path, image, error in pending:
            if image is None:
                yield {"path": path, "error": error}
                continue
            p = next(probabilities)
            order = np.argsort(-p)[:k]
            yield {"path": path, "label": self.classes[order[0]], "probability": float(p[order[0]]),
                   "top_k": [{"label": self.classes[i], "probability": float(p[i])} for i in order]}


def _with_expansion(sources) -> Iterator:
    for source in sources:
        if isinstance(source, (bytes, bytearray)):
            yield source
        else:
            yield from expand_sources([source])


def _describe(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return f"cannot read image ({type(error).__name__}: {error})"


def load(folder: str | Path, device: str = "cpu") -> Predictor:
    """Load a model bundle for prediction."""
    return Predictor(folder, device=device)
