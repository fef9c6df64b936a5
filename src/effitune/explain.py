"""Where the model looks: Grad-CAM heatmaps of a bundle's PyTorch network (captum's `LayerGradCam`).

A heatmap says which part of the model's input crop raised the score of one class: the gradient of
that class's logit, averaged per channel, weighs the activations of a layer (by default the
backbone's last feature map, after its last stage: the 1/32-resolution map the head pools, the last
one with a place), then ReLU and bilinear up-sampling to the input size. A class learnt from a shortcut (a watermark, a background, a border)
shows its heat there rather than on the object.

`explain_batch` runs a batch; `Explanation` places its heatmap back on the original image (the
model saw the centre crop of `data.images.crop_box`), gives the peak as fractions of the original
image and renders the overlay. `Predictor.explain` / `effitune explain` call it; bundles need no change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import files
from .errors import UserError
from .models import backbones
from .models.network import Network

OVERLAY_SIDE = 640  # longest side of an overlay PNG, px
OVERLAY_ALPHA = 0.5  # weight of the heat colour where the heat is 1


@dataclass
class Explanation:
    """One image's heatmap. `heatmap`: (size, size) float32 in [0, 1] over the model's input crop,
    which is `box` (left, top, right, bottom) of the original image in its pixels; `peak`: the
    heatmap's maximum as [x, y] fractions of the original image's width and height (origin top left),
    None when no region raised the class at all. `error`: why an image could not be explained."""
    path: str
    label: str | None = None  # the class the model predicts
    probability: float | None = None  # its calibrated probability
    target: str | None = None  # the class explained (the predicted one unless asked)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    box: tuple[float, float, float, float] | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the original, oriented
    peak: tuple[float, float] | None = None
    image: Image.Image | None = field(default=None, repr=False)  # the original (decoded reduced), for overlay
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready: path, label, probability, target, peak (or path, error)."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probability": self.probability, "target": self.target,
                "peak": list(self.peak) if self.peak is not None else None}

    def overlay(self, max_side: int = OVERLAY_SIDE, alpha: float = OVERLAY_ALPHA) -> Image.Image:
        """The original image (longest side at most `max_side`) with the heat laid over the crop the
        model saw; outside the crop the image is shown dimmed."""
        if self.image is None or self.heatmap is None:
            raise ValueError(f"{self.path}: no heatmap to draw ({self.error or 'no image kept'})")
        return overlay(self.image, self.heatmap, self.box, max_side=max_side, alpha=alpha)


def explain_batch(network: Network, images: np.ndarray, targets: Sequence[int] | None = None,
                  layer: torch.nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, size, size, 3) model inputs -> (logits (N, classes), heatmaps (N, size, size) in [0, 1]).

    `targets`: the class index to explain per image (default: the predicted one). `layer`: the
    module whose output is weighed (default: the last feature map, `backbones.last_feature_map`).
    """
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise UserError("Explanations need captum (Grad-CAM): pip install captum") from None

    network = network.eval()
    device = next(network.parameters()).device
    size = images.shape[1]
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    with torch.no_grad():
        logits = network(batch).float()
    chosen = logits.argmax(1) if targets is None else torch.as_tensor(list(targets), device=device)
    cam = LayerGradCam(network, layer if layer is not None else backbones.last_feature_map(network.backbone))
    with torch.enable_grad():
        maps = cam.attribute(batch.requires_grad_(True), target=chosen, relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach().float(), (size, size), interpolate_mode="bilinear")[:, 0]
    top = maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # an all-zero map stays zero
    heatmaps = (maps / top).clamp_(0, 1)
    return logits.cpu().numpy(), heatmaps.cpu().numpy().astype(np.float32)


def peak(heatmap: np.ndarray, box: tuple[float, float, float, float],
         image_size: tuple[int, int]) -> tuple[float, float] | None:
    """The heatmap's maximum as [x, y] fractions of the original image (None: an all-zero heatmap)."""
    if not heatmap.size or float(heatmap.max()) <= 0:
        return None
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    left, top, right, bottom = box
    x = left + (column + 0.5) / heatmap.shape[1] * (right - left)
    y = top + (row + 0.5) / heatmap.shape[0] * (bottom - top)
    return round(float(x) / image_size[0], 4), round(float(y) / image_size[1], 4)


def overlay(image: Image.Image, heatmap: np.ndarray, box: tuple[float, float, float, float],
            max_side: int = OVERLAY_SIDE, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """`image` with `heatmap` (over its `box`) in matplotlib's `jet` colours: heat 0 leaves the image,
    heat 1 blends in `alpha` of the colour. Outside the box the image is dimmed."""
    from matplotlib import colormaps

    scale = min(1.0, max_side / max(image.size))
    shown = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                        Image.Resampling.BILINEAR)
    pixels = np.asarray(shown, dtype=np.float32)
    left, top, right, bottom = (round(v * scale) for v in box)
    left, top = max(0, left), max(0, top)
    right, bottom = min(shown.width, max(left + 1, right)), min(shown.height, max(top + 1, bottom))
    heat = np.asarray(Image.fromarray((heatmap * 255).astype(np.uint8)).resize((right - left, bottom - top),
                                                                              Image.Resampling.BILINEAR),
                      dtype=np.float32)[..., None] / 255
    colour = colormaps["jet"](heat[..., 0])[..., :3].astype(np.float32) * 255
    out = pixels * 0.55  # dimmed outside the crop
    region = pixels[top:bottom, left:right]
    weight = alpha * np.sqrt(heat)  # faint heat still shows
    out[top:bottom, left:right] = region * (1 - weight) + colour * weight
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def save_overlay(explanation: Explanation, folder: str | Path, taken: set[str] | None = None) -> Path:
    """Write `explanation.overlay()` as FOLDER/<image name>.heatmap.png and return its path. `taken`:
    the names written so far by this call's caller; an image of the same name gets -2, -3... (a file
    left from an earlier run is replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(explanation.path.split("?")[0]).stem if not explanation.path.startswith("<") else "image"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "image"
    taken = taken if taken is not None else set()
    name, number = f"{stem}.heatmap.png", 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}.heatmap.png"
    taken.add(name)
    path = folder / name
    with files.replacing(path, suffix=".png") as temporary:
        explanation.overlay().save(temporary, format="PNG")
    return path


CORNER_SIDE = 1 / 3  # a corner square's side, as a fraction of the crop's side (1/9 of its area)
CORNER_SHARE = 0.25  # a class whose mean heat puts this share in one corner square is flagged (uniform: 0.11)
CENTRE_SHARE = 0.1  # ... or less than this share in the middle half of each side, off the object (uniform: 0.25)
_CORNERS = ("top left", "top right", "bottom left", "bottom right")


def heat_summary(heatmaps: Sequence[np.ndarray]) -> dict:
    """Where a set of heatmaps (of one class) puts its mass on average, each scaled to sum 1:
    `centroid` [x, y] and `centre_share` (in the middle half of each side) as fractions of the crop,
    `corner` (the corner square, of side `CORNER_SIDE`, with the most mass) and its `corner_share`.
    `flagged`: "corner" when that share reaches `CORNER_SHARE` (a mark or a watermark there may be what
    the model learnt instead of the object), "edges" when under `CENTRE_SHARE` of the mass is in the
    middle (a border or the background, where a photographed object seldom is), else False."""
    usable = [h / h.sum() for h in heatmaps if h.sum() > 0]
    if not usable:
        return {"images": 0, "flagged": False}
    mean = np.mean(usable, axis=0)
    rows, columns = mean.shape
    y, x = np.mgrid[0:rows, 0:columns]
    k, q = max(1, round(rows * CORNER_SIDE)), rows // 4
    shares = [mean[:k, :k].sum(), mean[:k, -k:].sum(), mean[-k:, :k].sum(), mean[-k:, -k:].sum()]
    corner, centre = int(np.argmax(shares)), float(mean[q:rows - q, q:columns - q].sum())
    flagged = "corner" if shares[corner] >= CORNER_SHARE else "edges" if centre < CENTRE_SHARE else False
    return {"images": len(usable), "centroid": [round(float((mean * (x + 0.5)).sum() / columns), 3),
                                                round(float((mean * (y + 0.5)).sum() / rows), 3)],
            "centre_share": round(centre, 3), "corner": _CORNERS[corner],
            "corner_share": round(float(shares[corner]), 3), "flagged": flagged}
