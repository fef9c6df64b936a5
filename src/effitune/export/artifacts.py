"""What every export shares: the bundle's `export` record and real images to check a graph on.

`effitune export` checks each graph on the run's own images (its manifest beside the bundle, the split
the bundle was trained from), and records what was checked under `export` in effitune.json.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..bundle import Preprocessing, read_meta, update_meta, weights_fingerprint
from ..data.images import load_for_model
from ..data.manifest import manifest_hash, read_manifest
from ..errors import EffituneWarning, UserError
from ..ood import stratified_sample
from ..predict import expand_sources
from ..runtime.graph import TOLERANCES, check_parity

PARITY_IMAGES = 128


def record_export(bundle: Path, **sections: dict) -> dict:
    """Merge sections into effitune.json's `export` (other formats already recorded stay), each with the
    fingerprint of the weights it was made from (`Predictor` refuses a file copied from another bundle)."""
    fingerprint = weights_fingerprint(bundle)
    sections = {name: {**section, "weights_sha1": fingerprint} for name, section in sections.items()}
    exported = {**read_meta(bundle).get("export", {}), **sections}
    return update_meta(bundle, export=exported)


def parity_gate(engine, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray], path: Path, described: str,
                runtime: str, instead: str, precision: str = "fp32") -> dict:
    """The check every exported file passes before it replaces `path`: `engine` (on the temporary file)
    against PyTorch's `reference` outputs on real images; a UserError that names what disagreed, else
    the parity record."""
    parity = {**check_parity(engine, images, reference, TOLERANCES[precision]), "images": described}
    if not parity["passed"]:
        raise UserError(
            f"{path.name} not written: {runtime} disagrees with PyTorch on {parity['n']} {described} "
            f"(max |logit difference| {parity['max_abs_logit_diff']:.2e}, allowed "
            f"{parity['tolerance']['allowed_max_abs_logit_diff']:.1e}; top-1 agreement {parity['top1_agreement']:.1%}, "
            f"needed {parity['tolerance']['min_top1_agreement']:.0%}). {instead}, and report the backbone and the "
            "versions (torch and the converter) as a bug.")
    return parity


# --- real images for the checks -----------------------------------------------------------------

def parity_images(bundle: Path, meta: dict, samples=None, limit: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """Images to compare on: `samples`, else the run's own images, else noise (with a warning)."""
    size = Preprocessing.from_meta(meta).size
    if samples is not None:
        images = as_images(samples, size)
        return images, "given images"
    for split in ("test", "val", "train"):
        found = manifest_images(bundle, meta, split, limit)
        if found is not None:
            return found[0], f"{split}-split images"
    warnings.warn(f"{bundle}: no manifest.csv next to the bundle and no samples given; checking ONNX parity on "
                  "random noise, which says little about real images. Pass samples (CLI: --samples DIR).", EffituneWarning,
                  stacklevel=3)
    return np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8), "random-noise images"


def as_images(samples, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) from an array of that shape or from image paths / folders / globs."""
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != (size, size, 3) or not len(samples):
            raise UserError(f"samples must be uint8 images of shape (N, {size}, {size}, 3); got {samples.dtype} "
                            f"{samples.shape}.")
        return samples
    paths = list(expand_sources([samples] if isinstance(samples, (str, Path)) else samples))
    images, _ = load_images(paths, size)
    if not len(images):
        raise UserError(f"No readable images in {samples}. Pass image files or a folder of images.")
    return images


def manifest_images(bundle: Path, meta: dict, split: str, limit: int | None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 images, class indices): a class-stratified sample of one split of BUNDLE/../manifest.csv.

    None when there is no manifest, it is not the one the bundle was trained on, or no image of the
    split can be read any more.
    """
    path = bundle.resolve().parent / "manifest.csv"
    if not path.is_file():
        return None
    if meta.get("manifest_sha1") and manifest_hash(path) != meta["manifest_sha1"]:
        warnings.warn(f"{path} changed since {bundle} was trained; not using its images", EffituneWarning, stacklevel=3)
        return None
    classes = list(meta["classes"])
    rows = [row for row in read_manifest(path) if row["split"] == split and row["label"] in classes]
    labels = np.array([classes.index(row["label"]) for row in rows], dtype=np.int64)
    chosen = stratified_sample(labels, limit, seed) if limit else np.arange(len(rows))
    images, readable = load_images([rows[i]["path"] for i in chosen], Preprocessing.from_meta(meta).size)
    return (images, labels[chosen][readable]) if len(images) else None


def load_images(paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, indices of the paths that could be read); unreadable files are skipped."""
    images, readable = [], []
    for index, path in enumerate(paths):
        try:
            images.append(load_for_model(path, size))
            readable.append(index)
        except Exception:  # noqa: BLE001 - a moved or broken file is skipped; the others still count
            continue
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, np.array(readable, dtype=np.int64)
