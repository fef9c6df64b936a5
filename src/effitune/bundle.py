"""The model bundle: the contract between training and everything after it.

A bundle is a folder holding `weights.safetensors` (no pickle) and `effitune.json` (format version,
classes, backbone, weight source, preprocessing, resolved config, metrics, temperature, unknown-image
threshold, data manifest hash, library versions, time), plus curves and metrics files. It is written
to a temporary sibling folder and renamed into place, so a crash never leaves a half-written bundle.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import files
from .errors import UserError

FORMAT_VERSION = 2  # 2: `features` may carry the frozen-prefix part (`embedding`) and knn-frozen
META_FILE = "effitune.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: effitune.json's `preprocessing` (as timm's
    `PretrainedCfg` travels with a timm model). Every reader of a bundle takes it from here."""
    size: int  # image side in pixels: the shorter side is resized to it, then a centre crop size x size
    mean: tuple[float, float, float]  # per-channel normalization, applied inside the network
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "shorter side to size, then center crop size x size"  # data.images.resize_center_crop
    input: str = "float32 RGB in [0, 1], NCHW (normalization is inside the model)"
    decode: str = ("EXIF-oriented RGB; a JPEG decoded reduced in the DCT (1/2, 1/4 or 1/8) to the smallest scale "
                   "whose shorter side is at least 2 x size (Pillow's draft), other formats whole")

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocessing":
        """From a bundle's metadata as `read_meta` returns it (checked there); older bundles lack the texts."""
        prep = meta["preprocessing"]
        known = {key: prep[key] for key in ("interpolation", "resize", "input", "decode") if key in prep}
        return cls(int(prep["size"]), tuple(map(float, prep["mean"])), tuple(map(float, prep["std"])), **known)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("effitune", "torch", "timm", "lightning", "numpy", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_bundle(folder: str | Path, state_dict: dict[str, torch.Tensor], meta: dict,
                extra_files: dict[str, Path] | None = None) -> Path:
    """Write the bundle atomically; an existing bundle at `folder` is replaced only once the new one is whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, staging / WEIGHTS_FILE)
        for name, source in (extra_files or {}).items():
            if Path(source).is_file():
                shutil.copyfile(source, staging / name)
        full_meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "versions": library_versions(), **meta}
        (staging / META_FILE).write_text(json.dumps(full_meta, indent=2, ensure_ascii=True))
        _swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def replace_bundle(staging: str | Path, folder: str | Path) -> Path:
    """Move a finished bundle folder into place in one rename (an old bundle there is replaced)."""
    read_meta(staging)  # refuse to publish something that does not load
    _swap_into_place(Path(staging), Path(folder))
    return Path(folder)


def _swap_into_place(staging: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)


def update_meta(folder: str | Path, **changes) -> dict:
    """Merge `changes` into a bundle's effitune.json (atomic replace of that one file)."""
    folder = Path(folder)
    meta = read_meta(folder)
    meta.update(changes)
    files.write_text(folder / META_FILE, json.dumps(meta, indent=2, ensure_ascii=True))
    return meta


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not folder.is_dir() or not meta_path.is_file():
        raise UserError(_not_a_bundle(folder))
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{meta_path} is damaged ({error}). Copy the bundle again or re-train.") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is damaged (a JSON object was expected). Copy the bundle again or re-train.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{meta_path}: 'format_version' should be a whole number (this effitune writes "
                        f"{FORMAT_VERSION}), not {json.dumps(version)}. Undo the edit, or copy the bundle again.")
    if version > FORMAT_VERSION:
        raise UserError(f"{meta_path} has bundle format {version}; this effitune reads up to "
                        f"{FORMAT_VERSION}. Upgrade effitune.")
    for key in ("classes", "backbone", "preprocessing"):
        if key not in meta:
            raise UserError(f"{meta_path} lacks '{key}'; the bundle is incomplete. Re-export it with `effitune train`.")
    _check_field_types(meta, meta_path)
    return meta


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(count: int, positive: bool = False):
    return lambda v: (isinstance(v, list) and len(v) == count and all(_number(x) for x in v)
                      and (not positive or all(x > 0 for x in v)))


# The fields that inference reads, as (path, required, check, what they should be). effitune.json is
# meant to be read by people and by other tools; one edited by hand gets an error naming the field.
_FIELDS = (
    (("classes",), True, lambda v: isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)
     and len(set(v)) == len(v), "a list of distinct class names (strings)"),
    (("backbone",), True, lambda v: isinstance(v, str) and v, "a timm model name such as 'tf_efficientnet_lite0'"),
    (("preprocessing",), True, lambda v: isinstance(v, dict), "an object with size, mean and std"),
    (("preprocessing", "size"), True, lambda v: _number(v) and int(v) == v and v >= 8,
     "the image side in pixels (an integer, at least 8)"),
    (("preprocessing", "mean"), True, _numbers(3), "a list of 3 numbers"),
    (("preprocessing", "std"), True, _numbers(3, positive=True), "a list of 3 positive numbers"),
    (("temperature",), False, lambda v: v is None or _number(v) and v > 0, "a positive number"),
    (("embedding",), False, lambda v: isinstance(v, dict), "an object"),
    *((("embedding", key), False, lambda v: _number(v) and int(v) == v and v >= 0, "a whole number")
      for key in ("frozen_depth", "pooled_dim", "prefix_dim")),
    (("unknown",), False, lambda v: v is None or isinstance(v, dict), "an object (or null)"),
    (("unknown", "score"), False, lambda v: isinstance(v, str), "a score name such as 'msp'"),
    (("unknown", "threshold"), False, _number, "a number"),
    (("unknown", "thresholds"), False, lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()),
     "an object of numbers"),
)


def _check_field_types(meta: dict, meta_path: Path) -> None:
    for path, required, check, expected in _FIELDS:
        parent = meta
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or (path[-1] not in parent and not required):
            continue  # an optional field, or one inside an absent optional section
        name = ".".join(path)
        if path[-1] not in parent:
            raise UserError(f"{meta_path} lacks '{name}'; the bundle is incomplete. Copy the bundle again or re-train.")
        if not check(parent[path[-1]]):
            raise UserError(f"{meta_path}: '{name}' should be {expected}, not {json.dumps(parent[path[-1]])[:80]}. "
                            "Undo the edit, or copy the bundle again.")


def _not_a_bundle(path: Path) -> str:
    if path.name == META_FILE and path.is_file():
        return f"{path} is the bundle's metadata file; pass the folder that holds it: {path.parent}"
    if (path / "model" / META_FILE).is_file():
        return f"{path} is a run folder; its model bundle is {path / 'model'}: pass that."
    if not path.exists():
        return f"{path} does not exist. Pass the model bundle folder that `effitune train` wrote (RUN/model)."
    return (f"{path} is not an effitune model bundle (no {META_FILE} inside). Pass the folder that "
            "`effitune train` wrote (its `model/` subfolder).")


def weights_fingerprint(path: str | Path) -> str:
    """SHA-1 of a bundle's weights file (the bundle folder or the file): what an exported graph records, so
    a stale copy is caught. Remembered per (file, size, mtime): a server or notebook hashes once."""
    path = Path(path)
    path = path / WEIGHTS_FILE if path.is_dir() else path
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha1()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the bundle is incomplete. Copy it again or re-train.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is corrupted ({error}). Copy the bundle again or re-train.") from None
