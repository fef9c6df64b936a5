"""Open any image file the way effitune sees it: decoded by content, EXIF-oriented, RGB.

One place for this so that scanning, the resize cache, prediction and serving can never disagree
about what an image looks like.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# Extensions we try to decode. Anything else is skipped (and counted), never guessed at. Phone formats
# are tried too: a file Pillow cannot decode is rejected with its reason, not skipped unseen.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico .avif .heic .heif".split()
)
# Formats Pillow decodes only with a plugin or a build option: the rejection says how to get them read.
NEEDS_PLUGIN = {".heic": "pillow-heif", ".heif": "pillow-heif", ".avif": "pillow-avif-plugin (or Pillow >= 11.3)"}
try:  # iPhone photos (HEIC/HEIF) decode when the optional pillow-heif plugin is installed
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()
EXIF_ORIENTATION_TAG = 0x0112
# Pillow warns from 89 MP and refuses from 179 MP. effitune sets its own limit where input is untrusted
# or trained on (scan, serve: data.max_pixels) and says so per file; a 108-MP phone photo given to
# `predict` is read, without Pillow's warning on the console. Pillow's refusal stays.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# `s3://…`, `gs://…`, `https://…`, `memory://…`, `file://…`: a scheme of two letters or more, so a
# Windows drive (C:\) is never taken for one.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# A JPEG is decoded at the smallest DCT scale (1/1, 1/2, 1/4 or 1/8) whose shorter side is still at
# least this many times the side it is resized to (Pillow's thumbnail keeps the same margin,
# reducing_gap 2.0): a 12-MP photo bound for 224 px decodes at 1/4, about 3x faster, and the
# bicubic resize after it sees twice the pixels it keeps. Training, prediction and serving share it
# (None: decode whole, as effitune did before; benchmarks/photo_ingest.py compares the two).
DECODE_MARGIN = 2


def is_url(source: object) -> bool:
    """A URL is read through fsspec; everything else is a local path and never goes near it."""
    return isinstance(source, str) and _URL.match(source) is not None


def open_binary(source: str | Path) -> BinaryIO:
    """A readable binary stream: `open` for a local path, fsspec for a URL (imported only then)."""
    if is_url(source):
        import fsspec

        return fsspec.open(source, "rb").open()
    return open(source, "rb")


def read_bytes(source: str | Path) -> bytes:
    with open_binary(source) as stream:
        return stream.read()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency (alpha or a colour key) is composited over white,
    16- and 32-bit images are rescaled."""
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")  # a palette entry or colour key marks the transparent pixels
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_stretch(np.asarray(image, dtype=np.float64), image.mode), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _stretch(array: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth values -> uint8 over their real range (Pillow's own I->L conversion clips at 255).

    A uniform image has no range: its one value is placed on the type's nominal scale instead
    (16-bit: 0..65535; float: 0..1 when it lies there), not turned black.
    """
    lo, hi = float(array.min()), float(array.max())
    if hi > lo:
        return ((array - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    nominal = 65535.0 if mode.startswith("I;16") or lo > 255 else 1.0 if mode == "F" and lo <= 1 else 255.0
    return np.full(array.shape, np.clip(round(lo * 255.0 / nominal), 0, 255), dtype=np.uint8)


def load_rgb(source: str | Path | bytes, max_pixels: int | None = None, at_least: int | None = None) -> Image.Image:
    """Decode, apply EXIF orientation (first frame of animations) and return RGB (`decode`)."""
    return decode(source, max_pixels, at_least)[0]


def decode(source: str | Path | bytes, max_pixels: int | None = None, at_least: int | None = None,
           header: dict | None = None) -> tuple[Image.Image, dict]:
    """(the EXIF-oriented RGB image, what the file says of itself), from one opening and one decode.

    The file's own account: `format`, `mode`, `size` (as stored, before orientation), `frames`,
    `orientation` (the EXIF tag, or None) and `transparency`. `at_least`: a JPEG is reduced while it
    is decoded (in the DCT, `reduced_decode`) to the smallest scale whose shorter side is still at
    least this; every byte of the file is still decoded, so a truncated file fails as it would in
    full. Other formats, and None, decode at full size. `header`: a dict to fill as the file is read,
    so a caller still knows what the file said when its pixels fail to decode.
    Raises the usual PIL/OS errors; callers turn them into user-facing reasons.
    """
    header = {} if header is None else header
    if is_url(source):
        source = read_bytes(source)  # fetched whole once: decoders seek, remote streams may not
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(stream) as image:
        header.update(format=image.format, mode=image.mode, size=image.size, transparency="transparency" in image.info)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} = {image.width * image.height} pixels exceeds the limit {max_pixels}"
            )
        header["frames"] = getattr(image, "n_frames", 1)
        image.seek(0)
        if at_least is not None:
            reduced_decode(image, at_least)
        image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG)  # after the load: a PNG's EXIF may follow its pixels
        header["orientation"] = orientation if isinstance(orientation, int) else None
        oriented = ImageOps.exif_transpose(image)
        return to_rgb(oriented if oriented is not None else image).copy(), header


def decode_side(size: int) -> int | None:
    """The shorter side a JPEG bound for `size` px is decoded at, at least (None: whole)."""
    return DECODE_MARGIN * size if DECODE_MARGIN else None


def reduced_decode(image: Image.Image, at_least: int) -> None:
    """Ask an opened, not yet loaded JPEG to decode at 1/2, 1/4 or 1/8 scale where its shorter side
    stays >= `at_least` (Pillow's `draft`); any other format ignores it."""
    shorter = min(image.size)
    if shorter <= at_least:
        return
    factor = at_least / shorter
    image.draft(None, (max(1, math.ceil(image.width * factor)), max(1, math.ceil(image.height * factor))))


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a width x height image that `resize_center_crop` keeps, in its pixels."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if max(new_w, new_h) > 16 * size:
        keep_w, keep_h = min(width, size / scale), min(height, size / scale)
        left, top = (width - keep_w) / 2, (height - keep_h) / 2
        return left, top, left + keep_w, top + keep_h
    across, down = new_w / width, new_h / height
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return left / across, top / down, (left + size) / across, (top + size) / down


def resize_center_crop(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to `size`, then center-crop a size x size square.

    This is effitune's one geometric preprocessing, stored in every bundle: the resize cache,
    evaluation, prediction and serving all call it. A very elongated image (the resized long side
    over 16 x size: never a photo or panorama) is cut to the part the crop keeps before resizing: a
    16 x 600,000 strip would otherwise become 224 x 8,400,000 pixels (5.6 GB) on its way to the crop.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if max(new_w, new_h) > 16 * size:
        keep_w, keep_h = min(width, size / scale), min(height, size / scale)
        left, top = (width - keep_w) / 2, (height - keep_h) / 2
        return image.resize((size, size), resample=resample, box=(left, top, left + keep_w, top + keep_h),
                            reducing_gap=3.0)
    resized = image.resize((new_w, new_h), resample=resample, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def load_for_model(source: str | Path | bytes | Image.Image | np.ndarray, size: int,
                   max_pixels: int | None = None) -> np.ndarray:
    """File, bytes, PIL image or image array -> uint8 array (size, size, 3), what the model expects.

    A JPEG file decodes reduced to at least `DECODE_MARGIN` x `size` (`reduced_decode`), the same in
    the resize cache, prediction and serving; an already decoded PIL image or array is resized as it is.
    """
    return np.asarray(resize_center_crop(model_image(source, size, max_pixels), size), dtype=np.uint8)


def model_image(source: str | Path | bytes | Image.Image | np.ndarray, size: int,
                max_pixels: int | None = None) -> Image.Image:
    """The oriented RGB image `load_for_model` resizes: what an explanation's overlay is drawn on."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, np.ndarray):
        return image_from_array(source)
    return load_rgb(source, max_pixels=max_pixels, at_least=decode_side(size))


def image_from_array(array: np.ndarray) -> Image.Image:
    """A uint8 image array, (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, as an RGB PIL image."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        raise ValueError(f"an image array must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4); got "
                         f"{array.dtype} {array.shape}. Values in [0, 1]: (array * 255).round().astype('uint8'); "
                         "channels first: array.transpose(1, 2, 0)")
    array = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
