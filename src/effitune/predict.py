"""Predictor: bundle -> preprocessing -> network -> top-k (+ unknown). The one place inference lives.

It needs neither the training code path nor the data: only the bundle folder. CLI `predict`,
`evaluate`, the HTTP server and the benchmarks all call it.
"""
from __future__ import annotations

import functools
import glob
import itertools
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .bundle import WEIGHTS_FILE, read_meta, read_weights, weights_fingerprint
from .data.images import IMAGE_EXTENSIONS, is_url, load_for_model
from .errors import UserError
from .export import ONNX_FILES
from .models.backbones import create_backbone
from .models.network import Network
from .ood import load_detector


def build_network(meta: dict) -> Network:
    backbone, _ = create_backbone(meta["backbone"], len(meta["classes"]), pretrained=False)
    prep = meta["preprocessing"]
    network = Network(backbone, tuple(prep["mean"]), tuple(prep["std"]))
    network.frozen_depth = meta.get("embedding", {}).get("frozen_depth")  # bundles before it: pooled only
    return network


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
    """Runs the bundle's network with PyTorch. Other engines (ONNX Runtime) offer the same `run`.

    In channels_last memory format (NHWC, as the images arrive): 1.5x faster than the default layout
    for lite0 on a CPU at 96 and 224 px (docs/benchmarks.md); the values are the same. The network
    is converted in place (no copy of the weights): export a network before giving it to an engine.
    """

    name = "torch"

    def __init__(self, network: Network, device: str = "cpu"):
        self.network, self.device = network.to(device).eval().to(memory_format=torch.channels_last), device

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P]): see Network.embedding), float32."""
        batch = torch.from_numpy(np.require(images, requirements="CW")).to(self.device).permute(0, 3, 1, 2)  # NHWC
        pooled, features = self.network.embedding(batch)
        return self.network.head(pooled).float().cpu().numpy(), features.float().cpu().numpy()


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]: the exported graph's `images` input."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OnnxEngine:
    """Runs an exported graph (`effitune export`) with ONNX Runtime on the CPU: same `run` as TorchEngine.

    `model`: the .onnx file, or the serialized graph itself (bytes: nothing written to disk).
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()  # one request uses every core
        options.inter_op_num_threads = 1  # a chain of convs has no parallel branches to spread over
        options.log_severity_level = 3
        in_memory = isinstance(model, bytes)
        self.path = None if in_memory else Path(model)
        self.name = "onnx" if in_memory else next((b for b, f in ONNX_FILES.items() if f == self.path.name), "onnx")
        self.session = ort.InferenceSession(model if in_memory else str(model), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        widths = {o.name: o.shape[-1] for o in self.session.get_outputs() if o.shape and isinstance(o.shape[-1], int)}
        self.feature_width, self.logit_width = widths.get("features"), widths.get("logits")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (logits (N, classes), features (N, D [+ P])), float32."""
        logits, features = self.session.run(["logits", "features"], {self.input: to_model_input(images)})
        return logits, features


BACKENDS = ("auto", "torch", *ONNX_FILES)


def choose_backend(folder: Path, backend: str, device: str = "cpu") -> str:
    """`auto`: ONNX Runtime when the bundle holds a parity-checked model.onnx and we run on the CPU."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "onnx" if device == "cpu" and (folder / ONNX_FILES["onnx"]).is_file() else "torch"
    if backend != "torch" and not (folder / ONNX_FILES[backend]).is_file():
        flag = {"onnx": "", "fp16": " --fp16", "int8": " --int8"}[backend]
        raise UserError(f"{folder / ONNX_FILES[backend]} is missing: create it with "
                        f"`effitune export {folder} --format onnx{flag}`, or use backend 'torch'.")
    return backend


def run_in_batches(engine, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """engine.run over `images` in batches; (logits, features) concatenated."""
    parts = [engine.run(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def expand_sources(sources: Iterable[str | Path]) -> Iterator[str]:
    """Files, folders (recursive, images only, sorted) and glob patterns, in the order given.

    Lazy: a folder is listed one directory at a time. URLs (`s3://…`) pass through unexpanded.
    """
    for source in as_sources(sources):
        text = str(source)
        if is_url(source):
            yield text
        elif os.path.isdir(text):
            for root, dirs, files in os.walk(text):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        yield os.path.join(root, name)
        elif _is_pattern(text):
            # a pattern that matches nothing stays an input, answered "no file matches" like a missing file
            yield from sorted(glob.glob(text, recursive=True)) or [text]
        else:
            yield text


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[") and not os.path.exists(text)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """`effitune.load(bundle)` returns one. `predictor.predict(["a.jpg", "photos/"])` -> list of dicts."""

    long_pass = 256  # images from which an in-memory ONNX Runtime engine repays its export (`pass_engine`)

    def __init__(self, folder: str | Path, device: str = "cpu", backend: str = "auto"):
        self._in_memory = None  # pass_engine's ONNX Runtime engine: None until tried, False if unavailable
        self._exporting = threading.Lock()
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.classes: list[str] = list(self.meta["classes"])
        self.size: int = int(self.meta["preprocessing"]["size"])
        self.temperature: float = float(self.meta.get("temperature") or 1.0)
        # features are [pooled | pooled frozen prefix] (Network.embedding); None: pooled only (older bundles)
        self.pooled_dim: int | None = self.meta.get("embedding", {}).get("pooled_dim")
        self.device = device
        self.backend = choose_backend(self.folder, backend, device)
        self.engine = self._open_engine(fallback=backend == "auto")
        self.unknown = load_detector(self.folder, self.meta)  # None: the bundle has no unknown-image statistics
        if self.unknown is not None:
            self.unknown.use_backend(self.backend)

    def _open_engine(self, fallback: bool):
        """The backend's engine. An exported file that cannot be read, or was not made from this bundle's
        weights (copied from another bundle, or left from before a re-train), is refused; with backend
        `auto` the bundle runs in PyTorch instead, with a warning."""
        if self.backend == "torch":
            return TorchEngine(self.network, self.device)
        path = self.folder / ONNX_FILES[self.backend]
        problem, engine = self._stale_export(path), None
        fix = f"Export it again: `effitune export {self.folder}`"
        if problem is None:
            try:
                engine = OnnxEngine(path)
            except ImportError as error:  # onnxruntime is the optional `effitune[export]`
                problem, fix = f"{path} needs ONNX Runtime ({error.name} is not installed)", \
                    "Install it: pip install 'effitune[export]'"
            except Exception as error:  # noqa: BLE001 - a damaged or foreign file: said, never a traceback
                problem = f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})"
        problem = problem or self._wrong_shape(engine, path)
        if problem is None:
            return engine
        if not fallback:
            raise UserError(f"{problem}. {fix}, or use --backend torch.")
        warnings.warn(f"{problem}; running in PyTorch instead. {fix}.", stacklevel=3)
        self.backend = "torch"
        return TorchEngine(self.network, self.device)

    def _stale_export(self, path: Path) -> str | None:
        record = self.meta.get("export", {}).get(self.backend)
        if not isinstance(record, dict):
            return f"{path} is not recorded in {self.folder / 'effitune.json'} (copied from another bundle?)"
        weights = self.folder / WEIGHTS_FILE  # a bundle shipped with its ONNX file alone: the record is trusted
        if "weights_sha1" in record and weights.is_file() and record["weights_sha1"] != weights_fingerprint(weights):
            return f"{path} was exported from other weights than this bundle's (another bundle's, or from before " \
                   "a re-train)"
        return None

    def _wrong_shape(self, engine: "OnnxEngine", path: Path) -> str | None:
        """An ONNX file must give this bundle's classes and the features its statistics were fitted on."""
        embedding = self.meta.get("embedding") or {}
        expected = embedding["pooled_dim"] + embedding["prefix_dim"] if embedding else None
        if engine.logit_width is not None and engine.logit_width != len(self.classes):
            return f"{path} gives {engine.logit_width} classes, but this bundle has {len(self.classes)}"
        if engine.feature_width is not None and expected is not None and engine.feature_width != expected:
            return f"{path} gives {engine.feature_width} feature columns, but this bundle's metadata says {expected}"
        return None

    @functools.cached_property
    def network(self) -> Network:
        """The PyTorch network (loaded on first use when an ONNX backend serves predictions)."""
        return load_network(self.folder, self.meta)

    def __repr__(self) -> str:
        return (f"Predictor({self.folder}, {self.meta['backbone']}, {len(self.classes)} classes, {self.size}px, "
                f"{self.backend})")

    def preprocess(self, source: str | Path | bytes | Image.Image | np.ndarray) -> np.ndarray:
        """Any image file, its bytes, a PIL image or a uint8 image array -> uint8 HWC array at the bundle's size."""
        return load_for_model(source, self.size)

    def run(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, size, size, 3) -> (logits, features), in batches (on `pass_engine`).

        features: the pooled features, then (bundles with an `embedding`) the pooled output of the
        layers training left frozen; `features[:, :self.pooled_dim]` is the pooled part."""
        images = self._checked(images)
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return self._run_fastest(images, len(images), batch_size)

    def _checked(self, images) -> np.ndarray:
        """The array `run` takes, or a UserError saying what it got and what to call instead."""
        array = np.asarray(images) if not isinstance(images, np.ndarray) else images
        expected = (self.size, self.size, 3)
        if array.dtype == np.uint8 and array.ndim == 4 and array.shape[1:] == expected or array.size == 0:
            return array
        hint = "add the batch axis: images[None]" if array.shape == expected else \
            "for files, PIL images or arrays of any size and dtype use predictor.predict([...]), or " \
            "predictor.preprocess(image) for each"
        raise UserError(f"Predictor.run/logits/probabilities take uint8 images of shape (N, {self.size}, {self.size}, "
                        f"3) (predictor.preprocess(x) for each, stacked); got {array.dtype} {array.shape}. {hint}.")

    def run_pass(self, chunks: Iterable[np.ndarray], images: int,
                 sample: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits, features) over `chunks` of uint8 images, `images` in all: one long pass (training's
        evaluation, a report, `evaluate`), on `pass_engine`.
        `sample`: the images to check ONNX Runtime on (default: the first chunk's first 32).
        """
        logits, features = [], []
        for chunk in chunks:
            out = self._run_fastest(chunk, images, sample=sample)
            logits.append(out[0])
            features.append(out[1])
        if not logits:
            return self.run(np.zeros((0, self.size, self.size, 3), np.uint8))
        return np.concatenate(logits), np.concatenate(features)

    def _run_fastest(self, images: np.ndarray, pass_images: int, batch_size: int = 64,
                     sample: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`images`, part of a pass over `pass_images`, on `pass_engine`. Should ONNX Runtime fail,
        these images and every later pass run on this predictor's own engine (a warning; the same values)."""
        engine = self.pass_engine(images[:32] if sample is None else sample, pass_images)
        try:
            return run_in_batches(engine, images, batch_size)
        except Exception as error:  # noqa: BLE001 - the faster engine failing costs time, never the pass
            if engine is self.engine:
                raise
            warnings.warn(f"ONNX Runtime failed during a pass ({type(error).__name__}: {error}); going on "
                          "in PyTorch (slower, same results)", stacklevel=3)
            self._in_memory = False
            return run_in_batches(self.engine, images, batch_size)

    def pass_engine(self, sample: np.ndarray, images: int):
        """The engine for one pass over `images` images (`run`, `run_pass`, a long `iter_predict`).

        On a CPU, a bundle served by PyTorch runs a long pass 1.7-2.3x faster in ONNX Runtime: the
        network is exported in memory (no file) and used only if it reproduces PyTorch on `sample`
        (uint8 images; `export.onnx.in_memory_engine`); one export per predictor. Otherwise (passes
        shorter than `long_pass`, which do not repay the ~1 s of export and check, other backends,
        GPUs, or without `effitune[export]`) this predictor's own engine: the same values, slower.
        """
        if self.backend != "torch" or self.device != "cpu" or not len(sample) or images < self.long_pass:
            return self.engine
        with self._exporting:  # the server's worker threads share one predictor: one export
            return self._in_memory_engine(sample) or self.engine

    def _in_memory_engine(self, sample: np.ndarray):
        if self._in_memory is None:
            try:
                from .export.onnx import in_memory_engine
            except ImportError:  # onnx / onnxruntime are the optional `effitune[export]`
                warnings.warn("long passes run in PyTorch: `pip install 'effitune[export]'` (ONNX Runtime) makes "
                              "them ~2x faster on a CPU", stacklevel=4)
                self._in_memory = False
            else:
                self._in_memory = in_memory_engine(self.network, sample) or False
        return self._in_memory

    def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return self.run(images, batch_size)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images), self.temperature)

    def predict(self, sources, top_k: int = 5, batch_size: int = 32, reject: bool = True) -> list[dict]:
        """One result dict per image, in order. `sources`: one or a list of files, folders, glob patterns,
        URLs, bytes, PIL images or uint8 image arrays ((H, W), (H, W, 3), (H, W, 4); (N, H, W, 3): N images)."""
        return list(self.iter_predict(sources, top_k=top_k, batch_size=batch_size, reject=reject))

    def iter_predict(self, sources, top_k: int = 5, batch_size: int = 32, reject: bool = True,
                     expand: bool = True, lookahead: bool = True) -> Iterator[dict]:
        """Streams results in input order; a file that fails gets an `error` entry and the rest go on.

        `expand=False` takes every source as one file (already expanded): exactly one result each.

        With unknown-image statistics in the bundle each result also has `unknown` (score below the
        calibrated threshold), `unknown_score` and `score_name`; `reject` sets `label` to None for an
        unknown image (`reject=False` keeps the raw class). `top_k` always lists the raw classes.

        A stream of `long_pass` images or more runs on `pass_engine` (on a CPU, ONNX Runtime without an
        exported file): the first `long_pass` sources are listed ahead (names, not pixels) to know.
        `lookahead=False` answers each batch as soon as its sources arrive (a slow generator: camera
        frames, a watched folder), on this predictor's own engine.
        """
        if top_k < 1:
            raise UserError(f"top_k is how many classes each result lists: at least 1 (got {top_k}).")
        sources = iter(_with_expansion(as_sources(sources)) if expand else as_sources(sources))
        ahead = list(itertools.islice(sources, self.long_pass if lookahead else 0))  # names only: a long pass?
        pass_images = len(ahead)
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        for source in itertools.chain(ahead, sources):
            label = _label(source)
            try:
                pending.append((label, self.preprocess(source), None))
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
                pending.append((label, None, _describe(error, label)))
            if len(pending) >= batch_size:
                yield from self._finish(pending, top_k, reject, pass_images)
                pending = []
        yield from self._finish(pending, top_k, reject, pass_images)

    def _finish(self, pending, top_k: int, reject: bool, pass_images: int) -> Iterator[dict]:
        good = [image for _, image, _ in pending if image is not None]
        logits, features = self._run_fastest(np.stack(good), pass_images) if good \
            else (np.zeros((0, len(self.classes))), None)
        probabilities = iter(softmax(logits, self.temperature))
        scores = iter(self.unknown.score(logits, features) if self.unknown is not None and good else [])
        k = max(1, min(top_k, len(self.classes)))
        for path, image, error in pending:
            if image is None:
                yield {"path": path, "error": error}
                continue
            p = next(probabilities)
            order = np.argsort(-p)[:k]
            result = {"path": path, "label": self.classes[order[0]], "probability": float(p[order[0]]),
                      "top_k": [{"label": self.classes[i], "probability": float(p[i])} for i in order]}
            if self.unknown is not None:
                score = float(next(scores))
                result.update(unknown=bool(self.unknown.is_unknown(score)), unknown_score=score,
                              score_name=self.unknown.score_name)
                result["label"] = None if reject and result["unknown"] else result["label"]
            yield result


def as_sources(sources) -> Iterable:
    """One source (a path, bytes, a PIL image, an image array) or many: always an iterable of sources.
    (A lone string would otherwise be read one character at a time, and '/' is a folder: the whole disk.)"""
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return [sources]
    if isinstance(sources, np.ndarray):
        return list(sources) if sources.ndim == 4 else [sources]  # (N, H, W, C): N images
    return sources


_IN_MEMORY = (bytes, bytearray, Image.Image, np.ndarray)  # sources that are images already, not names


def _label(source) -> str:
    """The `path` a result reports for its source."""
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {'x'.join(map(str, source.shape))}>"
    return str(source)


def _with_expansion(sources) -> Iterator:
    for source in sources:
        if isinstance(source, _IN_MEMORY):
            yield source
        else:
            yield from expand_sources([source])


def _describe(error: Exception, source: str = "") -> str:
    if isinstance(error, FileNotFoundError) and is_url(source) and not source.startswith("file:"):
        return "could not fetch it: no such address, or this machine cannot reach it"  # fsspec says both this way
    if isinstance(error, FileNotFoundError):
        return "no file matches this pattern" if _is_pattern(source) else "file not found"
    return f"cannot read image ({type(error).__name__}: {error})"


def load(folder: str | Path, device: str = "cpu", backend: str = "auto") -> Predictor:
    """Load a model bundle for prediction (`backend`: auto | torch | onnx | fp16 | int8)."""
    return Predictor(folder, device=device, backend=backend)
