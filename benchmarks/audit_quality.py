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
import csv
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
    # copies: made from one of the clean images of the set (its partner), then filed under another class
    # ("class") or put in another split than the partner's in the manifest ("split")
    copy_of_clean: str | None = None

    def ranked(self, report: dict) -> list[str]:
        """The paths the audit flags with this kind's finding, in the audit's order (worst first)."""
        if self.relabel:
            return [issue["path"] for issue in report["model_audit"]["label_issues"]]
        if self.copy_of_clean:
            flag = "label_conflict" if self.copy_of_clean == "class" else "leakage"
            return [path for group in report["exact_duplicates"] + report["near_duplicates"] if group[flag]
                    for path in group["paths"]]
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


def retouched(image: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """A near copy: contrast x0.95 and brightness +6 (other bytes, the same picture)."""
    return (image.astype(np.float32) * 0.95 + 6).clip(0, 255).round().astype(np.uint8)


ALL_KINDS = {kind.name: kind for kind in (Kind("blurred", blurred, "blurry"), Kind("darkened", darkened, "dark"),
                                           Kind("flipped", unchanged, "label_issue", relabel=True),
                                           Kind("cross_class_copy", retouched, "duplicate across classes",
                                                copy_of_clean="class"),
                                           Kind("cross_split_copy", retouched, "duplicate across splits",
                                                copy_of_clean="split"))}
KINDS: tuple[Kind, ...] = (ALL_KINDS["blurred"], ALL_KINDS["darkened"])  # --kinds chooses


# ------------------------------------------------------------------------------------------ data
def write_planted_set(folder: Path, n: int, args: argparse.Namespace) -> tuple[dict[str, set[str]], dict[str, str]]:
    """N images in `folder/<class>/`: clean ones and `share` x N of each kind; ({kind or "clean": paths},
    {copy: the clean image it was made from}).

    With a cross-split kind, `folder.parent / "manifest.csv"` gives every image a seeded random split
    (70/15/15, not duplicate-aware, as a user's own split may be), each such copy another than its partner's.
    """
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(args.seed)
    per_class = n // len(FASHION_MNIST_CLASSES)
    planted_per_class = max(1, round(args.share * per_class))
    clean_per_class = per_class - planted_per_class * len(KINDS)
    truth: dict[str, set[str]] = {"clean": set(), **{kind.name: set() for kind in KINDS}}
    partner_of: dict[str, str] = {}
    shutil.rmtree(folder, ignore_errors=True)
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        (folder / name).mkdir(parents=True, exist_ok=True)
        plan = [("clean", None, clean_per_class)] + [(kind.name, kind, planted_per_class) for kind in KINDS]
        start = 0
        for truth_name, kind, count in plan:
            for index in members[start:start + count]:
                if kind is not None and kind.copy_of_clean:  # a copy of one of this class's clean images
                    index = members[rng.integers(clean_per_class)]
                pixels = images[index] if kind is None else kind.plant(images[index], args)
                filed = name
                if kind is not None and (kind.relabel or kind.copy_of_clean == "class"):  # another class, at random
                    filed = FASHION_MNIST_CLASSES[rng.choice([c for c in range(len(FASHION_MNIST_CLASSES)) if c != label])]
                    (folder / filed).mkdir(parents=True, exist_ok=True)
                path = folder / filed / f"{truth_name}_{index:05d}_{start}.png"
                while path.exists():  # the same clean image copied twice
                    path = path.with_name(path.stem + "b.png")
                Image.fromarray(pixels, "L").save(path)
                truth[truth_name].add(os.path.abspath(path))
                if kind is not None and kind.copy_of_clean:
                    partner_of[os.path.abspath(path)] = os.path.abspath(folder / name / f"clean_{index:05d}_0.png")
            start += count
    (folder.parent / "manifest.csv").unlink(missing_ok=True)
    if any(kind.copy_of_clean == "split" for kind in KINDS):
        write_random_split(folder.parent / "manifest.csv", truth, partner_of, rng)
    return truth, partner_of


def write_random_split(path: Path, truth: dict[str, set[str]], partner_of: dict[str, str], rng) -> None:
    """A manifest with a seeded random split per image; each cross-split copy in another split than its partner."""
    splits = ("train", "val", "test")
    everything = sorted(set().union(*truth.values()))
    split_of = {item: splits[rng.choice(3, p=[0.7, 0.15, 0.15])] for item in everything}
    for item in truth.get("cross_split_copy", ()):
        split_of[item] = next(s for s in rng.permutation(splits) if s != split_of[partner_of[item]])
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        writer.writerows([item, Path(item).parent.name, split_of[item]] for item in everything)


# ---------------------------------------------------------------------------------------- scoring
def score(report: dict, truth: dict[str, set[str]], partner_of: dict[str, str]) -> dict:
    """Per kind: recall, precision, precision among the first N and false alarms on clean images. A copy's
    partner (the clean image it was made from) is rightly in its duplicate group: neither a hit nor an alarm."""
    clean = truth["clean"]
    row: dict = {"images": sum(len(paths) for paths in truth.values()), "clean": len(clean)}
    for kind in KINDS:
        flagged, planted = kind.found(report), truth[kind.name]
        partners = {partner_of[path] for path in planted if path in partner_of}
        counted = flagged - partners
        first = [path for path in kind.ranked(report) if path not in partners][:len(planted)]
        row[kind.name] = {"planted": len(planted), "found": len(flagged & planted),
                          "recall": len(flagged & planted) / len(planted),
                          "precision": len(counted & planted) / len(counted) if counted else None,
                          "precision_at_n": sum(path in planted for path in first) / len(planted),
                          "false_alarm_rate": len(counted & clean) / len(clean)}
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

    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.overrides)}
    run = data.parent / "-".join(["run", *args.overrides])
    if not (run / "model" / "effitune.json").is_file():
        effitune.train(data, out=run, progress=False,
                       config=effitune.load_config(overrides=overrides) if overrides else None)
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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting other than the default for flipped (e.g. train.unfreeze=0); "
                             "the label probe reads ImageNet features, not the trained ones, so a short training "
                             "measures the same label-error path")
    args = parser.parse_args()
    global KINDS
    KINDS = tuple(ALL_KINDS[name] for name in args.kinds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
          f"command: {' '.join(sys.argv)}", flush=True)
    rows = []
    for n in args.sizes:
        data = args.work / f"fashion-{n}" / "data"
        truth, partner_of = write_planted_set(data, n, args)
        began = time.perf_counter()
        result = scan(data, out=data.parent / "scan", workers=args.workers)
        scanned = time.perf_counter()
        manifest = data.parent / "manifest.csv"
        splits = list(csv.DictReader(manifest.open())) if manifest.is_file() else None  # path, label, split
        report = audit(result, manifest=splits).to_dict()
        audited = time.perf_counter()
        if any(kind.relabel for kind in KINDS):
            report["model_audit"] = model_audit(data, result.records_path, args).to_dict()
        row = score(report, truth, partner_of)
        row.update(scan_seconds=scanned - began, audit_seconds=audited - scanned,
                   model_seconds=time.perf_counter() - audited,
                   blur_radius=args.blur_radius, dark_factor=args.dark_factor, share=args.share, seed=args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
