"""Image quality: cleanvision's per-image properties, measured by the scan, judged against the data set.

The scan calls `measure(image)` on the image it has already decoded and stores the numbers in the
record ("quality"); `find_quality_issues(records)` then flags the images that are outliers against
their own class (brightness, sharpness, information) or data set (size, aspect, colour). Fences are
relative, never absolute: Fashion-MNIST is white clothing on black at 28 px, and cleanvision's fixed
thresholds call nearly all of it dark and blurry. A data set that is all dark flags nothing as dark;
a darkened copy among normal images is flagged. Linear in the number of images: one quantile per group.

The properties are cleanvision's own functions (`cleanvision.issue_managers.image_property`), called
on one PIL image, without its pandas pipeline or its file reading.
"""
from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------- thresholds
# Every threshold of the quality checks, in one place. A value is flagged beyond a Tukey fence of its
# group: below Q1 - max(k * IQR, gap) (or above Q3 + max(k * IQR, gap)), in the units of the column
# `scale` gives. k = 3 is Tukey's "far out" fence (cleanvision's odd-size check uses it too); the gap
# keeps a group whose values are all alike (IQR 0) from flagging every small difference.
KINDS = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
FENCE_IQRS = {"dark": 3.0, "light": 3.0, "low_information": 3.0, "odd_aspect_ratio": 3.0, "odd_size": 3.0,
              # 2, not 3: measured on 1,500 Fashion-MNIST images (benchmarks/audit_quality.py), copies blurred
              # with a 1-px Gaussian are found 90% at k = 3, 95% at k = 2, 96% at k = 1.5, while clean images
              # flagged blurry go 0.15%, 0.37%, 0.60%.
              "blurry": 2.0}
MIN_GAPS = {"dark": math.log(1.5),  # at least 1.5x darker (99th-percentile brightness) than the class's Q1
            "light": math.log(1.5),  # darkest 5% of pixels at least 1.5x closer to white
            "blurry": math.log(1.2),  # edges at least 1.2x weaker (a class of sharp images has a narrow IQR)
            "low_information": 1.0,  # at least 1 bit less entropy
            "odd_aspect_ratio": math.log(1.5),  # at least 1.5x more elongated
            "odd_size": math.log(2.0)}  # sides at least twice (or half) the usual
OWN_CLASS_MIN = 50  # a class with fewer images is judged against the whole data set
GRAYSCALE_MAX_SHARE = 0.1  # grayscale images are flagged only while they are at most this share of the data
GRAYSCALE_SPREAD = 2.0  # mean spread of R, G, B (0-255) under which an RGB image counts as grayscale
ANALYSIS_SIDE = 64  # cleanvision's MAX_RESOLUTION_FOR_BLURRY_DETECTION: every property is measured at it
_BRIGHTNESS_PERCENTILES = (5, 99)  # cleanvision's light (5th) and dark (99th) scores


# ------------------------------------------------------------------------------- one image (scan)
@functools.lru_cache(maxsize=1)
def _properties():
    """cleanvision's property functions; imported once, by the scan before its workers fork (the
    package imports pandas and matplotlib: about a second)."""
    from cleanvision.issue_managers import image_property

    return image_property


def load() -> None:
    """Import cleanvision now (in the parent process, so that forked scan workers share it)."""
    _properties()


def measure(image: Image.Image) -> dict[str, Any]:
    """The quality numbers of one decoded RGB image, as cleanvision computes them, at ANALYSIS_SIDE.

    Measured on one resize to at most ANALYSIS_SIDE (what cleanvision's blurriness does itself), so
    the numbers do not depend on the scale the scan decoded at, and cost the same for any image.
    """
    properties = _properties()
    small = _analysis_copy(image)
    grey = small.convert("L")
    p05, p99 = properties.calc_percentile_brightness(small, list(_BRIGHTNESS_PERCENTILES))
    return {"brightness_p05": round(float(p05), 4), "brightness_p99": round(float(p99), 4),
            "blurriness": round(_blurriness(properties, grey), 3),
            "entropy": round(float(properties.calc_entropy(small)), 3),
            "channel_spread": _channel_spread(small)}


def _blurriness(properties, grey: Image.Image) -> float:
    """cleanvision's blurriness (the spread of `get_edges`, Pillow's FIND_EDGES) on the edges' interior.

    Its own `calc_blurriness` takes every pixel, but Pillow copies the 1-px border of the input into
    the output unfiltered: a flat grey picture scores 44, and the border's brightness swamps the edges
    of a small image, so a darker copy would score blurrier. The border is left out here.
    """
    edges = np.asarray(properties.get_edges(grey), dtype=np.float64)
    interior = edges[1:-1, 1:-1] if min(edges.shape) > 2 else edges
    return float(interior.std())


def _analysis_copy(image: Image.Image) -> Image.Image:
    ratio = max(image.width, image.height) / ANALYSIS_SIDE
    if ratio <= 1:
        return image
    return image.resize((max(int(image.width // ratio), 1), max(int(image.height // ratio), 1)))


def _channel_spread(image: Image.Image) -> float:
    """Mean of max(R, G, B) - min(R, G, B) over the pixels (0: grey). cleanvision reads the file's mode
    ("L"), but the scan hands over RGB, and a grey picture saved as RGB is grey too: the pixels decide."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return round(float((pixels.max(axis=2) - pixels.min(axis=2)).mean()), 3)


# --------------------------------------------------------------------------------- the checks
@dataclass(frozen=True)
class _Check:
    kind: str
    value: Callable[[dict], float | None]  # the record -> the number shown (cleanvision's scale)
    scale: Callable[[float], float]  # the number -> where the fence is drawn (log for ratios)
    side: str  # "low" | "high" | "both"
    per_class: bool  # content varies by class; size and shape belong to the data set


def _stat(name: str) -> Callable[[dict], float | None]:
    return lambda record: (record.get("quality") or {}).get(name)


def _light_score(record: dict) -> float | None:
    p05 = _stat("brightness_p05")(record)
    return None if p05 is None else 1.0 - p05  # cleanvision's light score: low = overexposed


def _aspect_score(record: dict) -> float | None:
    width, height = record.get("width"), record.get("height")
    return min(width / height, height / width) if width and height else None  # cleanvision's: 1 = square


def _size_score(record: dict) -> float | None:
    width, height = record.get("width"), record.get("height")
    return math.sqrt(width * height) if width and height else None  # cleanvision's: sqrt of the area


def _log(value: float) -> float:
    return math.log(max(value, 1e-6))


CHECKS = (
    _Check("dark", _stat("brightness_p99"), _log, "low", True),
    _Check("light", _light_score, _log, "low", True),
    _Check("blurry", _stat("blurriness"), _log, "low", True),
    _Check("low_information", _stat("entropy"), float, "low", True),
    _Check("odd_aspect_ratio", _aspect_score, _log, "low", False),
    _Check("odd_size", _size_score, _log, "both", False),
)


@dataclass
class QualityIssue:
    """One image that stands out: `value` on cleanvision's scale, `typical` its group's median."""

    kind: str
    path: str
    label: str
    split: str | None
    value: float
    typical: float
    fence: float  # the bound it crossed, on the same scale as `value`
    severity: float  # how far beyond the fence, in the group's IQRs (at least the gap): ranks the list

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QualityFindings:
    issues: list[QualityIssue]
    measured: int  # records that carry the statistics (a scan older than them carries none)

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(issue.kind for issue in self.issues)
        return {kind: found[kind] for kind in KINDS if found[kind]}


def find_quality_issues(records: Sequence[dict]) -> QualityFindings:
    """The quality issues of usable scan records, each kind's worst first; an image may have several."""
    issues: list[QualityIssue] = []
    for check in CHECKS:
        issues += _run_check(check, records)
    issues = _dark_explains_weak_edges(issues, records)
    issues += _grayscale_among_colour(records)
    order = {kind: i for i, kind in enumerate(KINDS)}
    issues.sort(key=lambda issue: (order[issue.kind], -issue.severity, issue.path))
    return QualityFindings(issues, sum(1 for record in records if record.get("quality")))


def _groups(records: Sequence[dict], per_class: bool) -> Iterable[list[int]]:
    """Indices judged together: each class of OWN_CLASS_MIN+ images alone, the rest (or all) as one."""
    if not per_class:
        yield list(range(len(records)))
        return
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_label[record["label"]].append(index)
    pooled = [i for members in by_label.values() if len(members) < OWN_CLASS_MIN for i in members]
    yield from (members for members in by_label.values() if len(members) >= OWN_CLASS_MIN)
    if pooled:
        yield pooled


def _run_check(check: _Check, records: Sequence[dict]) -> list[QualityIssue]:
    found = []
    for members in _groups(records, check.per_class):
        values = [(i, v) for i in members if (v := check.value(records[i])) is not None]
        if len(values) < 4:
            continue
        scaled = np.array([check.scale(v) for _, v in values])
        q1, median, q3 = np.quantile(scaled, [0.25, 0.5, 0.75])
        reach = max(FENCE_IQRS[check.kind] * (q3 - q1), MIN_GAPS[check.kind])
        unit = max(q3 - q1, MIN_GAPS[check.kind])
        low, high = q1 - reach, q3 + reach
        typical = float(np.quantile([v for _, v in values], 0.5))
        for (index, value), position in zip(values, scaled):
            below = check.side in ("low", "both") and position < low
            above = check.side in ("high", "both") and position > high
            if below or above:
                bound = low if below else high
                found.append(_issue(check.kind, records[index], value, typical, _unscale(check, bound),
                                    abs(position - bound) / unit))
    return found


def _unscale(check: _Check, bound: float) -> float:
    return math.exp(bound) if check.scale is _log else bound


def _issue(kind: str, record: dict, value: float, typical: float, fence: float, severity: float) -> QualityIssue:
    return QualityIssue(kind=kind, path=record["path"], label=record["label"], split=record.get("split"),
                        value=round(float(value), 4), typical=round(float(typical), 4), fence=round(float(fence), 4),
                        severity=round(float(severity), 3))


def _dark_explains_weak_edges(issues: list[QualityIssue], records: Sequence[dict]) -> list[QualityIssue]:
    """A darkened image has weaker edges only because it is darker: it stays "blurry" only when its
    edges are weak for its brightness too (blurriness / 99th-percentile brightness beyond the fence
    of its group's), else it is reported as dark alone."""
    dark = {issue.path for issue in issues if issue.kind == "dark"}
    suspects = {issue.path for issue in issues if issue.kind == "blurry"} & dark
    if not suspects:
        return issues
    relative = _Check("blurry", _relative_blurriness, _log, "low", True)
    still = {issue.path for issue in _run_check(relative, records)}
    return [issue for issue in issues if not (issue.kind == "blurry" and issue.path in suspects - still)]


def _relative_blurriness(record: dict) -> float | None:
    blurriness, p99 = _stat("blurriness")(record), _stat("brightness_p99")(record)
    return None if blurriness is None or not p99 else blurriness / p99


def _grayscale_among_colour(records: Sequence[dict]) -> list[QualityIssue]:
    """cleanvision flags every grayscale image; here only those among mostly colour images."""
    spreads = [(record, spread) for record in records if (spread := _stat("channel_spread")(record)) is not None]
    grey = [(record, spread) for record, spread in spreads if spread < GRAYSCALE_SPREAD]
    if not grey or len(grey) > GRAYSCALE_MAX_SHARE * len(spreads):
        return []
    typical = float(np.median([spread for _, spread in spreads]))
    return [_issue("grayscale", record, spread, typical, GRAYSCALE_SPREAD, 1.0) for record, spread in grey]
