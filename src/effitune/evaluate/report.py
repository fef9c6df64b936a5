"""A report people would rather look at than read: one self-contained `report.html` per model.

`write_report(bundle)` runs the bundle over its labelled images once and writes, to `RUN/report/`:
training curves with phase boundaries, test metrics with a confusion matrix and the most confused
pairs, a gallery of the most confident mistakes, a reliability diagram before and after the bundle's
temperature, the model-assisted data audit (`data_audit.py`), the images of poor quality the
file-level audit finds (`data/quality.py`) and the split distribution. Figures
are embedded as base64 PNG, so the page opens offline and fetches nothing; the same figures are
saved as PNG files beside it, and every number is in `report.json`.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import files
from .. import timings as run_timings
from ..bundle import read_meta
from ..data.quality import find_quality_issues
from ..data.sources import read_source
from ..errors import EffituneWarning, UserError
from ..predict import Embedded, Predictor, embed
from ..runtime.batching import softmax
from . import plots
from .data_audit import NEIGHBOURS

MISTAKES_SHOWN = 24
CONFUSED_PAIRS = 10
_AUDIT_SHOWN = 12
_THUMBNAIL = 112


# ------------------------------------------------------------------------------------ the data
def read_history(bundle: Path) -> list[dict]:
    """The bundle's copy of history.csv, else the run's; [] when neither exists."""
    for path in (bundle / "history.csv", bundle.parent / "history.csv"):
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as stream:
                return list(csv.DictReader(stream))
    return []


# -------------------------------------------------------------------------------- the numbers
@dataclass
class Evaluation:
    split: str  # which rows the metrics are on: "test", "val" or "all"
    indices: np.ndarray  # into the rows
    labels: np.ndarray  # class indices (bundle order)
    probabilities: np.ndarray  # calibrated (the bundle's temperature)
    raw: np.ndarray  # T = 1


def evaluation_split(rows: Sequence[dict]) -> str:
    splits = {row.get("split") for row in rows}
    return "test" if "test" in splits else "val" if "val" in splits else "all"


def evaluate_rows(rows: Sequence[dict], logits: np.ndarray, classes: list[str], temperature: float) -> Evaluation:
    split = evaluation_split(rows)
    indices = np.array([i for i, row in enumerate(rows) if split == "all" or row.get("split") == split], dtype=int)
    unknown = sorted({rows[i]["label"] for i in indices} - set(classes))
    if unknown:
        raise UserError(f"The data has classes the model does not know: {unknown[:5]}. The bundle knows "
                        f"{classes[:10]}{'...' if len(classes) > 10 else ''}.")
    labels = np.array([classes.index(rows[i]["label"]) for i in indices], dtype=np.int64)
    chosen = logits[indices] if len(indices) else np.zeros((0, len(classes)), np.float32)
    return Evaluation(split, indices, labels, softmax(chosen, temperature), softmax(chosen))


def most_confused(confusion: Sequence[Sequence[int]], classes: list[str], limit: int = CONFUSED_PAIRS) -> list[dict]:
    """Off-diagonal cells, largest first: which true class goes to which wrong one, and how often."""
    counts = np.asarray(confusion)
    totals = counts.sum(axis=1)
    cells = [(int(counts[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
             if i != j and counts[i, j] > 0]
    return [{"true": classes[i], "predicted": classes[j], "count": n, "share_of_true": n / int(totals[i])}
            for n, i, j in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:limit]]


def confident_mistakes(evaluation: Evaluation, rows: Sequence[dict], classes: list[str],
                       limit: int = MISTAKES_SHOWN) -> list[dict]:
    predicted = evaluation.probabilities.argmax(axis=1)
    confidence = evaluation.probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != evaluation.labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return [{"path": rows[evaluation.indices[i]]["path"], "label": classes[evaluation.labels[i]],
             "predicted": classes[predicted[i]], "confidence": float(confidence[i])} for i in wrong]


def split_table(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for row in rows:
        part = table.setdefault(row.get("split") or "all", {})
        part[row["label"]] = part.get(row["label"], 0) + 1
    return {split: dict(sorted(counts.items())) for split, counts in table.items()}


def quality_summary(rows: Sequence[dict], records: dict[str, dict] | None) -> dict | None:
    """The file-level audit's image-quality findings on the rows' scan records (no pixels read again);
    None without records (a manifest with no records.jsonl beside it)."""
    if records is None:
        return None
    chosen = [records[key] for row in rows if (key := os.path.normpath(row["path"])) in records]
    findings = find_quality_issues(chosen)
    return {"measured": findings.measured, "counts": findings.counts,
            "issues": [issue.to_dict() for issue in findings.issues]}


def quality_gallery(quality: dict | None, thumbnail) -> bytes | None:
    """PNG thumbnails of the worst images of each quality kind, each with its number beside the typical one."""
    shown = quality_shown((quality or {}).get("issues", []))
    if not shown:
        return None
    return plots.png(plots.gallery(
        [thumbnail(q["path"]) for q in shown],
        [f"{q['kind'].replace('_', ' ')}: {q['label']}\n{q['value']:.3g} (typical {q['typical']:.3g})" for q in shown]))


def quality_shown(issues: Sequence[dict], limit: int = _AUDIT_SHOWN) -> list[dict]:
    """Up to `limit` findings for the gallery, taken in turn from each kind (each kind's worst first)."""
    by_kind: dict[str, list[dict]] = {}
    for issue in issues:
        by_kind.setdefault(issue["kind"], []).append(issue)
    shown: list[dict] = []
    for rank in range(limit):
        shown += [found[rank] for found in by_kind.values() if rank < len(found)]
    return shown[:limit]


# ---------------------------------------------------------------------------------- the report
def write_report(bundle: str | Path, data: str | Path | None = None, out: str | Path | None = None, *,
                 device: str = "cpu", cache: str | Path | None = None, embedded: Embedded | None = None) -> Path:
    """Write report.html, report.json and the figures as PNG; return the path of report.html.

    `data`: a DATA folder, CSV or manifest.csv (default: the run's `manifest.csv` beside the bundle).
    `out`: default `RUN/report` beside the bundle. `cache`: the run's `cache_root` (default effitune's):
    images it holds are read from there (`predict.row_images`), not decoded again.
    `embedded`: this bundle's outputs for the data's rows, when already computed (else computed here).
    """
    from .calibration import reliability
    from .data_audit import audit_features, image_metadata, split_embedding
    from .metrics import classification_metrics

    began = time.perf_counter()
    bundle = Path(bundle)
    meta = read_meta(bundle)
    data = Path(data) if data is not None else bundle.parent / "manifest.csv"
    if not data.exists():
        raise UserError(f"No data to report on: {data} does not exist. Pass the DATA folder or manifest.csv the "
                        "model was trained on.")
    out = Path(out) if out is not None else bundle.parent / "report"
    source = read_source(data)
    rows, records = source.rows, source.records
    predictor = Predictor(bundle, device=device)
    classes, temperature = predictor.classes, predictor.temperature
    if embedded is None or not embedded.covers(rows):
        embedded = embed(predictor, rows, cache=cache)
    logits, features = embedded.logits, embedded.features
    features, frozen = split_embedding(features, predictor.pooled_dim)  # label errors read the frozen part
    evaluation = evaluate_rows(rows, logits, classes, temperature)
    paths = [row["path"] for row in rows]
    audit = audit_features(features, [r["label"] for r in rows], paths, splits=[r.get("split") for r in rows],
                           metadata=image_metadata(paths, records), device=device, frozen_features=frozen)
    metrics = classification_metrics(evaluation.probabilities, evaluation.labels, classes) \
        if len(evaluation.labels) else {}
    labelled = len(evaluation.labels) > 0
    calibration = {"temperature": temperature, "fitted": meta.get("temperature") is not None,
                   "before": reliability(evaluation.raw, evaluation.labels) if labelled else None,
                   "after": reliability(evaluation.probabilities, evaluation.labels) if labelled else None}
    summary = {
        "bundle": str(bundle.resolve()), "data": str(data.resolve()), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "backbone": meta["backbone"], "classes": classes, "image_size": predictor.size,
        "weight_source": meta.get("weight_source"), "phases": meta.get("phases", []),
        "evaluated_on": evaluation.split, "n_evaluated": int(len(evaluation.labels)), "metrics": metrics,
        "most_confused": most_confused(metrics["confusion"], classes) if metrics else [],
        "mistakes": confident_mistakes(evaluation, rows, classes) if metrics else [],
        "calibration": calibration, "splits": split_table(rows), "audit": audit.to_dict(),
        "quality": quality_summary(rows, records),
        "timings": run_timings.read(bundle.parent),
    }
    summary["warnings"] = _report_warnings(summary) + audit.warnings
    thumbnails = Thumbnails(rows, cache, predictor.size)
    overlays = _mistake_overlays(predictor, summary["mistakes"], thumbnails)  # adds each one's peak_in_crop
    figures = _figures(summary, read_history(bundle), audit, thumbnails, overlays)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in figures.items():
        (out / f"{name}.png").write_bytes(image)
    summary["figures"] = [f"{name}.png" for name in figures]
    summary["seconds"] = round(time.perf_counter() - began, 1)
    _write_atomic(out / "report.json", json.dumps(_json_safe(summary), indent=2, ensure_ascii=True))
    return _write_atomic(out / "report.html", render_html(summary, figures))


def report_after_training(run_dir: str | Path, *, device: str = "cpu", cache: str | Path | None = None,
                          embedded: Embedded | None = None) -> Path | None:
    """The end of `train()`: the bundle is already in place, so a failing report warns and nothing is lost."""
    run_dir = Path(run_dir)
    try:
        path = write_report(run_dir / "model", out=run_dir / "report", device=device, cache=cache, embedded=embedded)
    except Exception as error:  # noqa: BLE001 - the report is a view of the model, never worth the model
        warnings.warn(f"The training report was not written ({type(error).__name__}: {error}). The model bundle "
                      f"is complete; try again with `effitune report {run_dir / 'model'}`.", EffituneWarning, stacklevel=2)
        return None
    return path


def _report_warnings(summary: dict) -> list[str]:
    warnings = []
    n = summary["n_evaluated"]
    if summary["evaluated_on"] != "test":
        warnings.append(f"No test split in the data: the metrics are on '{summary['evaluated_on']}' images, which "
                        "the model or its calibration may have seen.")
    if 0 < n < 100:
        warnings.append(f"Only {n} images were evaluated: one image moves the accuracy by {1 / n:.1%}.")
    return warnings


def _mistake_overlays(predictor: Predictor, mistakes: list[dict], thumbnails: "Thumbnails") -> list[np.ndarray]:
    """Where the model looked in each mistake (`Predictor.explain` on the crop it saw, read from the
    cache: no original decoded), for the predicted class; [] when the explanation fails (said). Each
    mistake gets `peak_in_crop`: the heatmap's peak [x, y] as fractions of that crop."""
    if not mistakes:
        return []
    try:
        explained = predictor.explain([thumbnails.model_input(m["path"]) for m in mistakes])
        for mistake, item in zip(mistakes, explained):
            mistake["peak_in_crop"] = list(item.peak) if item.peak is not None else None
        return [np.asarray(item.overlay(max_side=_THUMBNAIL)) for item in explained]
    except Exception as error:  # noqa: BLE001 - the heatmaps are an aid: the report goes on without them
        warnings.warn(f"The mistakes' heatmaps were left out of the report ({type(error).__name__}: {error}).",
                      EffituneWarning, stacklevel=3)
        return []


def _figures(summary: dict, history: list[dict], audit, thumbnail: "Thumbnails",
             overlays: list[np.ndarray] = ()) -> dict[str, bytes]:
    """{name: PNG bytes}, in the order the page shows them."""
    classes = summary["classes"]
    figures: dict[str, bytes] = {}
    if history:
        figures["curves"] = plots.png(plots.training_curves(history))
    metrics = summary["metrics"]
    if metrics:
        figures["confusion"] = plots.png(plots.confusion_matrix(metrics["confusion"], classes))
    if summary["mistakes"]:
        mistakes = summary["mistakes"]
        images = [thumbnail(m["path"]) for m in mistakes]
        captions = [f"true: {m['label']}\npredicted: {m['predicted']}\n{m['confidence']:.2f}" for m in mistakes]
        colours = ["#c53030"] * len(mistakes)
        if overlays:  # each mistake beside where the model looked for the class it predicted
            images = [image for pair in zip(images, overlays) for image in pair]
            captions = [text for m, caption in zip(mistakes, captions)
                        for text in (caption, f"where it saw\n{m['predicted']}\n")]
            colours = [colour for colour in colours for colour in (colour, "black")]
        figures["mistakes"] = plots.png(plots.gallery(images, captions, colours=colours))
    calibration = summary["calibration"]
    if calibration["before"]:
        figures["reliability"] = plots.png(plots.reliability_diagram(calibration["before"], calibration["after"],
                                                                     calibration["temperature"]))
    issues = audit.label_issues[:_AUDIT_SHOWN]
    if issues:
        figures["label_issues"] = plots.png(plots.gallery(
            [thumbnail(r["path"]) for r in issues],
            [f"given: {r['label']}\nsuggested: {r['suggested']}\np {r['self_confidence']:.2f} vs "
             f"{r['suggested_probability']:.2f}" for r in issues]))
    pairs = audit.near_duplicates[:_AUDIT_SHOWN // 2]
    if pairs:
        images, captions = [], []
        for k, pair in enumerate(pairs, 1):
            for side in "ab":
                images.append(thumbnail(pair[f"path_{side}"]))
                split = pair[f"split_{side}"]
                captions.append(f"pair {k}{side}: {pair[f'label_{side}']}{' / ' + split if split else ''}"
                                f"\ncosine {pair['similarity']:.3f}")
        figures["near_duplicates"] = plots.png(plots.gallery(images, captions, columns=6))
    outliers = audit.flagged_outliers[:_AUDIT_SHOWN] or audit.outliers[:6]
    if outliers:
        figures["outliers"] = plots.png(plots.gallery([thumbnail(r["path"]) for r in outliers],
                                                      [f"{r['label']}\nkNN distance {r['score']:.3f}" for r in outliers]))
    quality = quality_gallery(summary.get("quality"), thumbnail)
    if quality is not None:
        figures["quality"] = quality
    if audit.shortcut.get("groups"):
        figures["shortcuts"] = plots.png(plots.shortcut_bars(audit.shortcut))
    figures["splits"] = plots.png(plots.split_distribution(summary["splits"], classes))
    return figures


class Thumbnails:
    """`thumbnails(path)`: an image of the data fitted into size x size for the report's galleries.

    An image in the run's resize-once cache (by its sha1) is shown as the model saw it, without
    decoding the original again; any other one is decoded reduced (`images.reduced_decode`) and
    EXIF-oriented. Grey when the file cannot be read any more.
    """

    def __init__(self, rows: list[dict], cache_root: str | Path | None, model_size: int, size: int = _THUMBNAIL):
        from ..data.cache import ImageCache

        self.size, self.model_size = size, model_size
        self.sha1 = {row["path"]: row.get("sha1") for row in rows}
        self.cache = ImageCache.existing(cache_root, model_size)

    def model_input(self, path: str) -> np.ndarray:
        """The crop the model saw (uint8 size x size x 3): the cache's entry, else decoded as training did."""
        key = self.sha1.get(path)
        if self.cache is not None and self.cache.cached([path], [key])[0]:
            return self.cache.get(key)
        from ..data.images import load_for_model

        return load_for_model(path, self.model_size)

    def __call__(self, path: str) -> np.ndarray:
        from PIL import Image

        from ..data.images import load_rgb

        key = self.sha1.get(path)
        try:
            if self.cache is not None and self.cache.cached([path], [key])[0]:
                image = Image.fromarray(self.cache.get(key))
            else:
                image = load_rgb(path, at_least=self.size)
        except Exception:  # noqa: BLE001 - a file that vanished since training must not stop the report
            return np.full((self.size, self.size, 3), 200, np.uint8)
        image.thumbnail((self.size, self.size))
        return np.asarray(image)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, text: str) -> Path:
    return files.write_text(path, text)


# ------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1a202c;background:#f7fafc}
header{background:#1a365d;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85;font-size:13px}nav{padding:8px 32px;background:#e2e8f0;font-size:13px}
nav a{margin-right:14px;color:#2a4365;text-decoration:none}main{padding:8px 32px 40px;max-width:1400px}
section{background:#fff;border-radius:8px;padding:16px 22px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{margin-top:0;color:#1a365d}h3{color:#2a4365;margin-bottom:6px}img{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{padding:4px 10px;border-bottom:1px solid #e2e8f0;
text-align:left;vertical-align:top}th{background:#edf2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#ebf4ff;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{font-size:12px;color:#4a5568}
.warn{background:#fffaf0;border-left:4px solid #dd6b20;padding:8px 12px;margin:6px 0;font-size:14px}
.muted{color:#718096;font-size:13px}.row{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}
"""
_SECTIONS = (("summary", "Summary"), ("curves", "Training curves"), ("metrics", "Test metrics"),
             ("mistakes", "Mistakes"), ("calibration", "Calibration"), ("audit", "Data audit"),
             ("splits", "Splits"))


def render_html(summary: dict, figures: dict[str, bytes]) -> str:
    """The whole page as one string: inline CSS, figures as data: URIs, no scripts, no external links."""
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{_SECTION_BODY[key](summary, figures)}</section>'
                   for key, title in _SECTIONS)
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title in _SECTIONS)
    title = f"effitune report: {summary['backbone']}, {len(summary['classes'])} classes"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body><header><h1>{_e(title)}</h1><p>bundle {_e(summary["bundle"])} &middot; data '
            f'{_e(summary["data"])} &middot; {_e(summary["created"])}</p></header><nav>{nav}</nav>'
            f'<main>{body}</main></body></html>\n')


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    encoded = base64.b64encode(figures[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}" data-figure="{_e(name)}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = (),
           limit: int | None = None) -> str:
    """An HTML table; past `limit` rows, a note that report.json has them all."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    lines = []
    for row in rows[:limit]:
        cells = "".join(f'<td class="{"num" if i in numeric else ""}">{_e(cell)}</td>' for i, cell in enumerate(row))
        lines.append(f"<tr>{cells}</tr>")
    more = f'<p class="muted">... and {len(rows) - limit} more in report.json.</p>' \
        if limit is not None and len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>{more}"


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _summary(summary: dict, figures: dict) -> str:
    metrics, calibration = summary["metrics"], summary["calibration"]
    cards = [("accuracy", _f(metrics.get("accuracy"))), ("top-3", _f(metrics.get("top_k", {}).get("3"))),
             ("macro F1", _f(metrics.get("macro", {}).get("f1"))),
             ("ECE after T", _f((calibration["after"] or {}).get("ece"))),
             ("temperature", _f(calibration["temperature"], 2)), ("images evaluated", str(summary["n_evaluated"]))]
    html_cards = "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards)
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in summary["warnings"]) or \
        '<p class="muted">No warnings.</p>'
    return (f'<div class="cards">{html_cards}</div><p>{_e(summary["backbone"])} at {summary["image_size"]} px, '
            f'weights: {_e(summary["weight_source"])}; metrics on the <b>{_e(summary["evaluated_on"])}</b> split, '
            f'probabilities scaled by the bundle\'s temperature.</p><h3>Warnings</h3>{warnings}')


def _curves(summary: dict, figures: dict) -> str:
    phases = summary["phases"]
    table = _table(["phase", "epochs", "best val accuracy", "seconds", "trained on", "best"],
                   [[p.get("phase"), p.get("epochs"), _f(p.get("val_acc")), p.get("seconds"), p.get("inputs"),
                     "yes" if p.get("best") else ""] for p in phases], numeric=(1, 2, 3)) if phases else ""
    picture = _img(figures, "curves", "training curves") or '<p class="muted">The bundle has no training history.</p>'
    return ('<p class="muted">Shaded by stage (blue: head only, orange: unfrozen stages); dashed lines start a '
            f'phase.</p>{picture}{table}{_timings_html(summary.get("timings"))}')


def _timings_html(timings: dict | None) -> str:
    """Where the run's time went (RUN/timings.json, up to this report), longest step first."""
    if not timings:
        return ""
    wall = timings.get("wall_seconds") or 0.0
    rows = [[name, f"{seconds:.1f}", "" if share is None else f"{share:.0%}"]
            for name, seconds, share in run_timings.ranked(timings)]
    return (f'<h3>Where the time went</h3><p class="muted">{wall:.0f} s of wall time before this report '
            f'(timings.json).</p>' + _table(["step", "seconds", "share"], rows, numeric=(1, 2)))


def _metrics(summary: dict, figures: dict) -> str:
    metrics = summary["metrics"]
    if not metrics:
        return '<p class="muted">No labelled images to evaluate.</p>'
    overall = [["accuracy", _f(metrics["accuracy"])]] + [[f"top-{k}", _f(v)] for k, v in metrics["top_k"].items()]
    for average in ("macro", "weighted"):
        overall += [[f"{average} {name}", _f(metrics[average][name])] for name in ("precision", "recall", "f1")]
    per_class = [[name, _f(r["precision"]), _f(r["recall"]), _f(r["f1"]), r["support"]]
                 for name, r in metrics["per_class"].items()]
    confused = [[p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.1%}"] for p in summary["most_confused"]]
    return (f'<p>{metrics["n"]} images from the {_e(summary["evaluated_on"])} split.</p><div class="row"><div>'
            f'<h3>Overall</h3>{_table(["metric", "value"], overall, numeric=(1,))}</div><div><h3>Per class</h3>'
            f'{_table(["class", "precision", "recall", "F1", "support"], per_class, numeric=(1, 2, 3, 4))}</div>'
            f'<div><h3>Most confused pairs</h3>'
            f'{_table(["true", "predicted as", "images", "share of true class"], confused, numeric=(2, 3))}</div>'
            f'</div><h3>Confusion matrix (rows: true class, normalised)</h3>'
            f'{_img(figures, "confusion", "confusion matrix")}')


def _mistakes(summary: dict, figures: dict) -> str:
    mistakes = summary["mistakes"]
    if not mistakes:
        return '<p class="muted">No mistakes on the evaluated images.</p>'
    rows = [[m["label"], m["predicted"], _f(m["confidence"]), m["path"]] for m in mistakes]
    return (f'<p>The {len(mistakes)} wrong predictions the model was most sure of: often label errors, near-identical '
            f'classes, or images unlike the training data. Beside each, where the model looked for the class it '
            f'predicted (Grad-CAM): heat on a corner, a border or the background instead of the object shows a '
            f'shortcut.</p>{_img(figures, "mistakes", "most confident mistakes")}'
            f'{_table(["true", "predicted", "confidence", "path"], rows, numeric=(2,))}')


def _calibration(summary: dict, figures: dict) -> str:
    calibration = summary["calibration"]
    if not calibration["before"]:
        return '<p class="muted">No labelled images to check calibration on.</p>'
    rows = [["T = 1 (raw softmax)", _f(calibration["before"]["ece"])],
            [f"T = {calibration['temperature']:.3f} (fitted on val)", _f(calibration["after"]["ece"])]]
    missing = '' if calibration["fitted"] else \
        '<div class="warn">This bundle carries no fitted temperature, so both curves are the raw softmax.</div>'
    return ('<p>Temperature scaling divides the logits by one number fitted on the validation split; it changes no '
            'prediction, only how sure the probabilities claim to be. ECE: the count-weighted gap between confidence '
            f'and accuracy.</p>{missing}{_table(["probabilities", "ECE"], rows, numeric=(1,))}'
            f'{_img(figures, "reliability", "reliability diagram")}')


def _audit(summary: dict, figures: dict) -> str:
    audit = summary["audit"]
    counts = audit["counts"]
    parts = [f'<p>What the model\'s features say about all {audit["n"]} labelled images. A linear probe on the '
             f'features reaches {_f(audit["out_of_fold_accuracy"])} out-of-fold accuracy.</p>']
    parts += [f'<div class="warn">{_e(w)}</div>' for w in audit["warnings"]]
    parts.append(f'<h3 id="label-errors">Likely label errors ({counts["label_issues"]})</h3><p class="muted">'
                 f'Out-of-fold probabilities from a 5-fold logistic regression on {_e(audit["label_features"])}; '
                 'flagged by cleanlab\'s confident learning (prune by noise rate), least likely given label first.</p>')
    parts.append(_img(figures, "label_issues", "likely label errors"))
    parts.append(_table(["given", "suggested", "p(given)", "p(suggested)", "split", "path"],
                        [[r["label"], r["suggested"], _f(r["self_confidence"]), _f(r["suggested_probability"]),
                          r["split"] or "", r["path"]] for r in audit["label_issues"]], numeric=(2, 3), limit=20))
    parts.append(f'<h3 id="near-duplicates">Near duplicates ({counts["near_duplicates"]} pairs with cosine &ge; '
                 f'{audit["similarity_threshold"]}; {counts["near_duplicates_across_classes"]} across classes, '
                 f'{counts["near_duplicates_across_splits"]} across splits)</h3>')
    parts.append(_img(figures, "near_duplicates", "near duplicates"))
    parts.append(_table(["cosine", "label a", "label b", "split a", "split b", "a", "b"],
                        [[_f(p["similarity"], 4), p["label_a"], p["label_b"], p["split_a"] or "", p["split_b"] or "",
                          p["path_a"], p["path_b"]] for p in audit["near_duplicates"]], numeric=(0,), limit=20))
    flagged = [o for o in audit["outliers"] if o["flagged"]]
    parts.append(f'<h3 id="outliers">Outliers ({len(flagged)} beyond the fence {_f(audit["outlier_cutoff"])})</h3>'
                 f'<p class="muted">Mean cosine distance to the {NEIGHBOURS} nearest other images (centred '
                 'features); the fence is Q3 + 3 IQR. The table lists the most distant images, beyond the fence '
                 'or not.</p>')
    parts.append(_img(figures, "outliers", "outliers"))
    parts.append(_table(["kNN distance", "label", "path", "beyond fence"],
                        [[_f(o["score"]), o["label"], o["path"], "yes" if o["flagged"] else ""]
                         for o in audit["outliers"]], numeric=(0,), limit=10))
    parts.append(_quality_html(summary.get("quality"), figures))
    parts.append(_shortcut_html(audit["shortcut"], figures))
    return "".join(parts)


def _quality_html(quality: dict | None, figures: dict) -> str:
    if quality is None:
        return ('<h3 id="quality">Image quality</h3><p class="muted">Skipped: no scan records (records.jsonl) '
                'beside the manifest.</p>')
    issues = quality["issues"]
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in quality["counts"].items()) or "none"
    return (f'<h3 id="quality">Image quality ({_e(counts)})</h3><p class="muted">No model needed: cleanvision\'s '
            'image properties (brightness, edge strength, entropy, size, aspect, colour) from the scan, each image '
            'judged against its own class (brightness, sharpness, information) or the whole data set (size, aspect, '
            f'grayscale among colour), not against fixed thresholds; {quality["measured"]} images measured.</p>'
            f'{_img(figures, "quality", "images of poor quality")}'
            + _table(["kind", "value", "typical", "label", "path"],
                     [[q["kind"].replace("_", " "), f"{q['value']:.3g}", f"{q['typical']:.3g}", q["label"], q["path"]]
                      for q in issues], numeric=(1, 2), limit=20))


def _shortcut_html(shortcut: dict, figures: dict) -> str:
    head = '<h3 id="shortcuts">Shortcut check: can metadata alone predict the class?</h3>'
    if not shortcut.get("groups"):
        return f'{head}<p class="muted">Skipped: {_e(shortcut.get("skipped", "no metadata"))}.</p>'
    rows = [[name, g["kind"], "constant" if g["constant"] else f"{g['accuracy']:.1%}",
             ", ".join(f"{c} ({j:.2f})" for c, j in list(g["separated"].items())[:3]),
             "yes" if name in shortcut["flagged"] else ""] for name, g in shortcut["groups"].items()]
    return (f'{head}<p class="muted">Cross-validated accuracy of a small decision tree that sees only width, height, '
            f'aspect, format, EXIF orientation, file size and mean colour; majority class {shortcut["majority"]:.1%}, '
            f'chance {shortcut["chance"]:.1%}. Classes it separates: TPR &minus; FPR in brackets.</p>'
            f'{_img(figures, "shortcuts", "shortcut check")}'
            f'{_table(["metadata", "kind", "accuracy", "classes it separates best", "flagged"], rows, numeric=(2,))}')


def _splits(summary: dict, figures: dict) -> str:
    splits = summary["splits"]
    parts = [p for p in ("train", "val", "test", "all") if p in splits]
    rows = [[c] + [splits[p].get(c, 0) for p in parts] + [sum(splits[p].get(c, 0) for p in parts)]
            for c in summary["classes"]]
    rows.append(["total"] + [sum(splits[p].values()) for p in parts] + [sum(sum(s.values()) for s in splits.values())])
    return (f'{_img(figures, "splits", "images per class and split")}'
            f'{_table(["class", *parts, "total"], rows, numeric=tuple(range(1, len(parts) + 2)))}')


_SECTION_BODY = {"summary": _summary, "curves": _curves, "metrics": _metrics, "mistakes": _mistakes,
                 "calibration": _calibration, "audit": _audit, "splits": _splits}
