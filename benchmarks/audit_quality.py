"""Planted defects: does `effitune audit` find the poor images planted among clean Fashion-MNIST ones?

Real Fashion-MNIST (Debian's files, `effitune.datasets.load_fashion_mnist`): N images, as many per
class, written as 28-px PNGs in a folder per class. A share of them (`--share` per kind) are planted
defects, made from other train images of the same class (never copies of the clean ones), so each
kind is measured on its own. Each kind is one `Kind`: how it is planted and which of the audit's
findings count as finding it; add a kind (flipped labels, cross-class copies, cross-split near
duplicates) by adding one to KINDS.

Then the audit runs as `effitune audit DATA` would (scan, then `data.audit.audit`), with no model,
and for each kind: recall (planted ones found), precision (of the images its check flags, the share
that were planted with it), and each check's false alarms on the clean images.

`--kinds flipped` plants flipped labels (an image of one class filed under another): a model is then
trained with the defaults on the planted set and `effitune audit DATA --model BUNDLE` runs
(`evaluate.data_audit.audit_data`); besides recall and precision it reports the precision among the
first N flagged (N = the number planted), the list a user reads from the top.

    python benchmarks/audit_quality.py --sizes 1500 15000 --work /tmp/audit-quality
    python benchmarks/audit_quality.py --sizes 1500 15000 --kinds flipped --work /tmp/audit-labels

The last line printed is one JSON list of the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from effitune.data.audit import audit
from effitune.data.scan import scan
from effitune.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist


# ------------------------------------------------------------------------------------------ kinds
@dataclass(frozen=True)
class Kind:
    """A kind of planted defect: `plant(image, args)` makes one from a clean uint8 image; `check` names the
    audit finding that counts as finding it; `found(report)`: the paths the audit flags with that finding."""

    name: str
    plant: Callable[[np.ndarray, argparse.Namespace], np.ndarray]
    check: str
    relabel: bool = False  # filed under another class (the image itself unchanged): needs a model to find

    def ranked(self, report: dict) -> list[str]:
        """The paths the audit flags with this kind's finding, in the audit's order (worst first)."""
        if self.relabel:
            return [issue["path"] for issue in report["model_audit"]["label_issues"]]
        return [issue["path"] for issue in report["quality_issues"] if issue["kind"] == self.check]

    def found(self, report: dict) -> set[str]:
        return set(self.ranked(report))


def blurred(image: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """A Gaussian blur of `--blur-radius` px (at 28 px: 1 px is ~8 px on a 224-px photo)."""
    return np.asarray(Image.fromarray(image, "L").filter(ImageFilter.GaussianBlur(args.blur_radius)))


def darkened(image: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """Every pixel times `--dark-factor` (0.4: about 1.3 stops under-exposed)."""
    return (image.astype(np.float32) * args.dark_factor).round().astype(np.uint8)


def unchanged(image: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    return image


ALL_KINDS = {kind.name: kind for kind in (Kind("blurred", blurred, "blurry"), Kind("darkened", darkened, "dark"),
                                           Kind("flipped", unchanged, "label_issue", relabel=True))}
KINDS: tuple[Kind, ...] = (ALL_KINDS["blurred"], ALL_KINDS["darkened"])  # --kinds chooses


# ------------------------------------------------------------------------------------------ data
def write_planted_set(folder: Path, n: int, args: argparse.Namespace) -> dict[str, set[str]]:
    """N images in `folder/<class>/`: clean ones and `share` x N of each kind; {kind or "clean": paths}."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(args.seed)
    per_class = n // len(FASHION_MNIST_CLASSES)
    planted_per_class = max(1, round(args.share * per_class))
    clean_per_class = per_class - planted_per_class * len(KINDS)
    truth: dict[str, set[str]] = {"clean": set(), **{kind.name: set() for kind in KINDS}}
    shutil.rmtree(folder, ignore_errors=True)
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        (folder / name).mkdir(parents=True, exist_ok=True)
        plan = [("clean", None, clean_per_class)] + [(kind.name, kind, planted_per_class) for kind in KINDS]
        start = 0
        for truth_name, kind, count in plan:
            for index in members[start:start + count]:
                pixels = images[index] if kind is None else kind.plant(images[index], args)
                filed = name
                if kind is not None and kind.relabel:  # another class, drawn at random
                    filed = FASHION_MNIST_CLASSES[rng.choice([c for c in range(len(FASHION_MNIST_CLASSES)) if c != label])]
                    (folder / filed).mkdir(parents=True, exist_ok=True)
                path = folder / filed / f"{truth_name}_{index:05d}.png"
                Image.fromarray(pixels, "L").save(path)
                truth[truth_name].add(os.path.abspath(path))
            start += count
    return truth


# ---------------------------------------------------------------------------------------- scoring
def score(report: dict, truth: dict[str, set[str]]) -> dict:
    clean = truth["clean"]
    row: dict = {"images": sum(len(paths) for paths in truth.values()), "clean": len(clean)}
    for kind in KINDS:
        flagged, planted = kind.found(report), truth[kind.name]
        first = kind.ranked(report)[:len(planted)]
        row[kind.name] = {"planted": len(planted), "found": len(flagged & planted),
                          "recall": len(flagged & planted) / len(planted),
                          "precision": len(flagged & planted) / len(flagged) if flagged else None,
                          "precision_at_n": sum(path in planted for path in first) / len(planted),
                          "false_alarm_rate": len(flagged & clean) / len(clean)}
    by_check: dict[str, set[str]] = {}
    for issue in report["quality_issues"]:
        by_check.setdefault(issue["kind"], set()).add(issue["path"])
    row["clean_flagged_by_check"] = {check: len(paths & clean) / len(clean) for check, paths in by_check.items()}
    row["clean_flagged_any"] = len(set().union(*by_check.values()) & clean) / len(clean) if by_check else 0.0
    return row


def table(rows: list[dict]) -> str:
    lines = ["| images | kind | planted | recall | precision | precision among the first N | "
             "false alarms on clean (its check) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for kind in KINDS:
            cell = row[kind.name]
            precision = "n/a" if cell["precision"] is None else f"{cell['precision']:.1%}"
            lines.append(f"| {row['images']} | {kind.name} ({kind.check}) | {cell['planted']} | {cell['recall']:.1%} | "
                         f"{precision} | {cell['precision_at_n']:.1%} | {cell['false_alarm_rate']:.2%} |")
    lines += ["", "| images | clean images flagged by any check | by check | scan + audit seconds |", "|---|---|---|---|"]
    for row in rows:
        checks = ", ".join(f"{check} {share:.2%}" for check, share in sorted(row["clean_flagged_by_check"].items()))
        lines.append(f"| {row['images']} | {row['clean_flagged_any']:.2%} | {checks or 'none'} | "
                     f"{row['scan_seconds']:.1f} + {row['audit_seconds']:.1f} |")
    return "\n".join(lines)


def model_audit(data: Path, records: Path, args: argparse.Namespace):
    """Train with the defaults on the planted set, then audit it with that model (`audit DATA --model`)."""
    import effitune
    from effitune.evaluate.data_audit import audit_data

    run = data.parent / "run"
    if not (run / "model" / "effitune.json").is_file():
        effitune.train(data, out=run, progress=False)
    return audit_data(run / "model", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 15000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/effitune-audit-quality"))
    parser.add_argument("--share", type=float, default=0.05, help="planted share of each kind (per class)")
    parser.add_argument("--blur-radius", type=float, default=1.0)
    parser.add_argument("--dark-factor", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="scan processes (default: all cores)")
    parser.add_argument("--kinds", nargs="+", choices=list(ALL_KINDS), default=["blurred", "darkened"],
                        help="defects to plant (flipped: trains a model with the defaults, then audits with it)")
    args = parser.parse_args()
    global KINDS
    KINDS = tuple(ALL_KINDS[name] for name in args.kinds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
          f"command: {' '.join(sys.argv)}", flush=True)
    rows = []
    for n in args.sizes:
        data = args.work / f"fashion-{n}" / "data"
        truth = write_planted_set(data, n, args)
        began = time.perf_counter()
        result = scan(data, out=data.parent / "scan", workers=args.workers)
        scanned = time.perf_counter()
        report = audit(result).to_dict()
        audited = time.perf_counter()
        if any(kind.relabel for kind in KINDS):
            report["model_audit"] = model_audit(data, result.records_path, args).to_dict()
        row = score(report, truth)
        row.update(scan_seconds=scanned - began, audit_seconds=audited - scanned,
                   model_seconds=time.perf_counter() - audited,
                   blur_radius=args.blur_radius, dark_factor=args.dark_factor, share=args.share, seed=args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
