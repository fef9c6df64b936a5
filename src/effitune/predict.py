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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .bundle import WEIGHTS_FILE, Preprocessing, read_meta, weights_fingerprint
from .data.cache import ImageCache
from .data.images import IMAGE_EXTENSIONS, crop_box, is_url, load_for_model, model_image, resize_center_crop
from .errors import EffituneWarning, UserError
from .models.network import Network
from .explain import Explanation, explain_batch, peak as explanation_peak
from .ood import load_detector
from .runtime import EXPORT_FILES, EXPORT_OPTIONS, EXTRAS
from .runtime.batching import run_in_batches, softmax
from .runtime.engines import TorchEngine, choose_backend, load_network, open_engine
from .runtime import graph


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


class Predictor:
    """`effitune.load(bundle)` returns one. `predictor.predict(["a.jpg", "photos/"])` -> list of dicts."""

    long_pass = 256  # images from which an in-memory ONNX Runtime engine repays its export (`pass_engine`)

    def __init__(self, folder: str | Path, device: str = "cpu", backend: str = "auto"):
        self._in_memory = None  # pass_engine's ONNX Runtime engine: None until tried, False if unavailable
        self._exporting, self._explaining = threading.Lock(), threading.Lock()
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.classes: list[str] = list(self.meta["classes"])
        self.preprocessing = Preprocessing.from_meta(self.meta)
        self.size: int = self.preprocessing.size
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
        path = self.folder / EXPORT_FILES[self.backend]
        problem, engine = self._stale_export(path), None
        fix = f"Export it again: `effitune export {self.folder} {EXPORT_OPTIONS[self.backend]}`"
        if problem is None:
            try:
                engine = open_engine(self.folder, self.backend)
            except ImportError as error:  # each runtime is an optional extra (onnxruntime, openvino, ai-edge-litert)
                problem, fix = f"{path} needs {error.name}, which is not installed", \
                    f"Install it: pip install 'effitune[{EXTRAS[self.backend]}]'"
            except Exception as error:  # noqa: BLE001 - a damaged or foreign file: said, never a traceback
                problem = f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})"
        problem = problem or self._wrong_shape(engine, path)
        if problem is None:
            return engine
        if not fallback:
            raise UserError(f"{problem}. {fix}, or use --backend torch.")
        warnings.warn(f"{problem}; running in PyTorch instead. {fix}.", EffituneWarning, stacklevel=3)
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

    def _wrong_shape(self, engine, path: Path) -> str | None:
        """An exported file must give this bundle's classes and the features its statistics were fitted on."""
        embedding = self.meta.get("embedding") or {}
        expected = embedding["pooled_dim"] + embedding["prefix_dim"] if embedding else None
        if engine.logit_width is not None and engine.logit_width != len(self.classes):
            return f"{path} gives {engine.logit_width} classes, but this bundle has {len(self.classes)}"
        if engine.feature_width is not None and expected is not None and engine.feature_width != expected:
            return f"{path} gives {engine.feature_width} feature columns, but this bundle's metadata says {expected}"
        return None

    @functools.cached_property
    def _explain_network(self) -> Network:
        """A copy of the network of its own for `explain`: its gradient hooks never meet a prediction
        running in another thread (serve) on `network`."""
        return load_network(self.folder, self.meta).to(self.device)

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
                          "in PyTorch (slower, same results)", EffituneWarning, stacklevel=3)
            self._in_memory = False
            return run_in_batches(self.engine, images, batch_size)

    def pass_engine(self, sample: np.ndarray, images: int):
        """The engine for one pass over `images` images (`run`, `run_pass`, a long `iter_predict`).

        On a CPU, a bundle served by PyTorch runs a long pass 1.7-2.3x faster in ONNX Runtime: the
        network is exported in memory (no file) and used only if it reproduces PyTorch on `sample`
        (uint8 images; `runtime.graph.in_memory_engine`); one export per predictor. Otherwise (passes
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
                import onnxruntime  # noqa: F401 - the optional `effitune[export]`
            except ImportError:
                warnings.warn("long passes run in PyTorch: `pip install 'effitune[export]'` (ONNX Runtime) makes "
                              "them ~2x faster on a CPU", EffituneWarning, stacklevel=4)
                self._in_memory = False
            else:
                self._in_memory = graph.in_memory_engine(self.network, sample) or False
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

    def explain(self, sources, target: str | None = None, batch_size: int = 16) -> list[Explanation]:
        """Where the model looks (`explain.Explanation`: Grad-CAM heatmap, its peak on the original
        image, `overlay()`), one per image in order; a file that fails gets an `error` and the rest go on.
        `target`: explain this class instead of each image's predicted one."""
        return list(self.iter_explain(sources, target=target, batch_size=batch_size))

    def iter_explain(self, sources, target: str | None = None, batch_size: int = 16) -> Iterator[Explanation]:
        """`explain`, streamed: `batch_size` images decoded and explained at a time (memory stays flat)."""
        if target is not None and target not in self.classes:
            raise UserError(f"--target {target!r} is not one of this model's classes: {self.classes[:10]}"
                            f"{'...' if len(self.classes) > 10 else ''}.")
        if batch_size < 1:
            raise UserError(f"batch_size is how many images are explained at a time: at least 1 (got {batch_size}).")
        pending: list[Explanation] = []
        for source in _with_expansion(as_sources(sources)):
            label = _label(source)
            try:
                pending.append(Explanation(label, image=model_image(source, self.size)))
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
                pending.append(Explanation(label, error=_describe(error, label)))
            if len(pending) >= batch_size:
                yield from self._explained(pending, target)
                pending = []
        yield from self._explained(pending, target)

    def _explained(self, pending: list[Explanation], target: str | None) -> Iterator[Explanation]:
        good = [item for item in pending if item.error is None]
        if good:
            images = np.stack([np.asarray(resize_center_crop(item.image, self.size), np.uint8) for item in good])
            targets = None if target is None else [self.classes.index(target)] * len(good)
            with self._explaining:  # captum hooks the layer for the pass: one explanation at a time
                logits, heatmaps = explain_batch(self._explain_network, images, targets)
            for item, p, heatmap in zip(good, softmax(logits, self.temperature), heatmaps):
                item.label, item.probability = self.classes[int(p.argmax())], float(p.max())
                item.target = target or item.label
                item.heatmap, item.image_size = heatmap, item.image.size
                item.box = crop_box(*item.image.size, self.size)
                item.peak = explanation_peak(heatmap, item.box, item.image_size)
        yield from pending

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



# --- images -> (logits, features) ---------------------------------------------------------------

@dataclass(frozen=True)
class Embedded:
    """What a bundle's network gave for `paths`: logits and features (`Network.embedding`), row by row.

    `failed`: the sources that could not be read (only for file names; rows of a scanned data set
    are readable). Training hands its pass over every manifest row to the report as one of these.
    """
    paths: list[str]
    logits: np.ndarray
    features: np.ndarray
    failed: list[str] = field(default_factory=list)

    def covers(self, rows: Sequence[dict]) -> bool:
        return len(rows) == len(self.paths) and all(
            os.path.normpath(row["path"]) == os.path.normpath(path) for row, path in zip(rows, self.paths))


EMBED_CHUNK = 256  # images decoded and held in RAM at a time


def embed(predictor: Predictor, sources: Iterable, *, cache: str | Path | None = None,
          chunk: int = EMBED_CHUNK) -> Embedded:
    """One pass of the bundle's network over `sources` (`Predictor.run_pass`: ONNX Runtime in memory on a
    CPU for long passes), `chunk` images in RAM at a time.

    `sources`: files, folders, globs or URLs (an unreadable one is listed in `failed`, not fatal), or
    rows of a data set (dicts with `path`, and `sha1` where known), read as `row_images` reads them:
    from the resize-once cache under `cache` (default: effitune's own, where training put them).
    """
    sources = list(sources)
    if sources and all(isinstance(source, dict) for source in sources):
        return _embed_rows(predictor, sources, cache, chunk)
    listed = list(expand_sources(sources))  # names only, so the pass knows its length
    paths, failed = [], []

    def chunks():
        for start in range(0, len(listed), chunk):
            batch = []
            for path in listed[start:start + chunk]:
                try:
                    batch.append(predictor.preprocess(path))
                    paths.append(path)
                except Exception:  # noqa: BLE001 - an unreadable file is counted, not fatal
                    failed.append(path)
            if batch:
                yield np.stack(batch)

    logits, features = predictor.run_pass(chunks(), len(listed))
    if not paths:
        logits, features = np.zeros((0, len(predictor.classes)), np.float32), np.zeros((0, 0), np.float32)
    return Embedded(paths, logits, features, failed)


def _embed_rows(predictor: Predictor, rows: list[dict], cache, chunk: int) -> Embedded:
    return Embedded([row["path"] for row in rows],
                    *predictor.run_pass(row_images(predictor, rows, cache=cache, chunk=chunk), len(rows)))


def row_images(predictor: Predictor, rows: Sequence[dict], *, cache: str | Path | None = None,
               chunk: int = EMBED_CHUNK, read: Callable[[str], np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """The model's input images for data-set rows, `chunk` at a time (uint8, N x size x size x 3).

    A row whose file the resize-once cache (`data.cache.images_root(cache)`) holds unchanged, by its
    `sha1`, is read from there: a run's own images are not decoded again after training. Any other row
    is decoded by `read` (default `predictor.preprocess`, the decode training used to fill the cache).
    Nothing is written to the cache.
    """
    paths = [row["path"] for row in rows]
    image_cache = ImageCache.existing(cache, predictor.size)
    keys = image_cache.cached(paths, [row.get("sha1") for row in rows]) if image_cache else [""] * len(rows)
    read = read or predictor.preprocess
    for start in range(0, len(rows), chunk):
        part = range(start, min(start + chunk, len(rows)))
        batch = np.empty((len(part), predictor.size, predictor.size, 3), np.uint8)
        hits = [n for n, i in enumerate(part) if keys[i]]
        if hits:
            batch[hits] = image_cache.stack([keys[part[n]] for n in hits])
        for n, i in enumerate(part):
            if not keys[i]:
                batch[n] = read(paths[i])
        yield batch


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
    """Load a model bundle for prediction (`backend`: auto | torch | onnx | fp16 | int8 | openvino |
    openvino-int8 | tflite | tflite-int8)."""
    return Predictor(folder, device=device, backend=backend)
