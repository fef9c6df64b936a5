"""Near-OOD: classes the model never saw, from the same domain as the ones it knows.

The held-out-class protocol (issue 21). For each seed, 2 of the 10 classes are held out. A model is
trained with effitune's defaults on the other 8 (`--per-class` images each). It then meets:
- 100 known images per class and 100 images of each held-out class, from the data set's test part;
- far-OOD sets (Fashion-MNIST: sklearn's digits, crops of scikit-image's photos, noise;
  digits: Fashion-MNIST images, photos, noise).
Every unknown-image score is computed side by side, as mean +- spread over the seeds:
AUROC, FPR at 95% TPR, and at the calibrated threshold the shares of known images accepted and of
unknown images rejected. Each split is then scored again with unknown example images (other images of
the held-out classes, from the data set's train part; never the test images) handed to the calibration,
as `effitune train --unknown-dir` would, to show the gain; and with the examples of one held-out class
only, tested on the other, to show what the probe does with unknowns unlike its examples.

The network runs once per split (`embed`); its outputs are kept in `WORK/<domain>-<per-class>-s<seed>/
arrays.npz`, so scoring again (`--score-only`) costs seconds.

    python benchmarks/near_ood.py --work /tmp/near-ood --domain fashion --per-class 150 --seeds 0 1 2 3 4
    python benchmarks/near_ood.py --work /tmp/near-ood --domain fashion --per-class 500 --seeds 0 1 2 3 4
    python benchmarks/near_ood.py --work /tmp/near-ood --domain digits --per-class 80 --seeds 0 1 2 3 4
    python benchmarks/near_ood.py --work /tmp/near-ood --domain fashion --per-class 150 --seeds 0 1 2 3 4 --score-only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood import write_noise, write_photo_crops  # noqa: E402  (benchmarks/ood.py: the far-OOD sets)

HELD_OUT = 2
TEST_PER_CLASS = 100  # known and unknown test images per class, from the test part
EXAMPLES_PER_CLASS = 50  # unknown example images per held-out class, from the train part (--examples)


def fashion_images() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    from effitune.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    return {part: (*load_fashion_mnist(part), list(FASHION_MNIST_CLASSES)) for part in ("train", "test")}


def digits_images() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """sklearn's 1,797 8x8 digits upscaled to 28x28, split in half per class into a 'train' and a 'test' part."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray((d * (255 / 16)).astype(np.uint8), "L")
                                  .resize((28, 28), Image.Resampling.BICUBIC)) for d in digits.images])
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(1234)
    test = np.zeros(len(labels), bool)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: len(members) // 2]] = True
    names = [f"digit_{d}" for d in range(10)]
    return {"train": (images[~test], labels[~test], names), "test": (images[test], labels[test], names)}


def write_pngs(folder: Path, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image, "L").save(folder / f"{prefix}_{i:05d}.png")


def pick(labels: np.ndarray, label: int, count: int, rng, exclude: np.ndarray | None = None) -> np.ndarray:
    members = np.flatnonzero(labels == label)
    if exclude is not None:
        members = np.setdiff1d(members, exclude)
    return np.sort(rng.choice(members, size=min(count, len(members)), replace=False))


def prepare_split(work: Path, domain: str, data: dict, per_class: int, seed: int) -> dict:
    """Folders of one seeded split: train/<class>, test/known, test/unknown, examples (idempotent)."""
    rng = np.random.default_rng(seed)
    names = data["train"][2]
    held = sorted(rng.choice(len(names), size=HELD_OUT, replace=False).tolist())
    layout = {"held_out": [names[i] for i in held], "train": work / "images", "known": work / "test-known",
              "unknown": work / "test-unknown", "examples": work / "examples"}
    marker = work / ".prepared"
    if marker.is_file():
        return layout
    shutil.rmtree(work, ignore_errors=True)
    train_images, train_labels, _ = data["train"]
    test_images, test_labels, _ = data["test"]
    for label, name in enumerate(names):
        chosen = pick(train_labels, label, per_class, rng)
        tests = pick(test_labels, label, TEST_PER_CLASS, rng)
        if label in held:
            write_pngs(layout["unknown"] / name, test_images[tests], "test")
            write_pngs(layout["examples"] / name, train_images[pick(train_labels, label, EXAMPLES_PER_CLASS, rng)],
                       "train")
        else:
            write_pngs(layout["train"] / name, train_images[chosen], "train")
            write_pngs(layout["known"] / name, test_images[tests], "test")
    marker.write_text(json.dumps(layout["held_out"]))
    return layout


def far_sets(work: Path, domain: str, data: dict) -> dict[str, Path]:
    """Far-OOD folders shared by every split of a domain."""
    sets = {"photos": work / "far" / "photos", "noise": work / "far" / "noise"}
    if not any(sets["photos"].glob("*.png")):
        write_photo_crops(sets["photos"])
    if not any(sets["noise"].glob("*.png")):
        write_noise(sets["noise"])
    other = "digits" if domain == "fashion" else "fashion-mnist"
    sets[other] = work / "far" / other
    if not any(sets[other].glob("*.png")):
        source = digits_images() if domain == "fashion" else fashion_images()
        images = source["test"][0]
        write_pngs(sets[other], images[np.random.default_rng(0).choice(len(images), 300, replace=False)], other)
    return sets


def embed_split(split: Path, layout: dict, far: dict[str, Path], overrides: dict | None = None) -> dict:
    """Train (with the defaults, or `overrides` of them), then one pass of the bundle over every set."""
    import effitune
    from effitune.data.manifest import read_manifest
    from effitune.predict import Predictor, embed

    run = split / "run"
    began = time.perf_counter()
    if not (run / "model" / "effitune.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        effitune.train(layout["train"], out=run, progress=False,
                       config=effitune.load_config(overrides=overrides) if overrides else None)
    train_seconds = time.perf_counter() - began
    predictor = Predictor(run / "model")
    classes = predictor.classes
    rows = read_manifest(run / "manifest.csv")
    arrays = {"classes": np.array(classes), "train_seconds": np.float64(train_seconds)}
    for part in ("train", "val"):
        chosen = [r for r in rows if r["split"] == part]
        found = embed(predictor, chosen)
        label_of = {r["path"]: classes.index(r["label"]) for r in chosen}
        arrays[f"{part}_logits"], arrays[f"{part}_features"] = found.logits, found.features
        arrays[f"{part}_labels"] = np.array([label_of[p] for p in found.paths])
    known = embed(predictor, [layout["known"]])
    arrays["known_logits"], arrays["known_features"] = known.logits, known.features
    arrays["known_labels"] = np.array([classes.index(Path(p).parent.name) for p in known.paths])
    for name, folder in {"unknown": layout["unknown"], "examples": layout["examples"], **far}.items():
        found = embed(predictor, [folder])
        arrays[f"set_{name}_logits"], arrays[f"set_{name}_features"] = found.logits, found.features
    head = predictor.network.backbone.get_classifier()
    arrays["head_weight"] = head.weight.detach().cpu().numpy()
    arrays["head_bias"] = head.bias.detach().cpu().numpy()
    arrays["temperature"] = np.float64(predictor.temperature)
    arrays["pooled_dim"] = np.int64(predictor.pooled_dim or known.features.shape[1])
    arrays["test_accuracy"] = np.float64((known.logits.argmax(1) == arrays["known_labels"]).mean())
    return arrays


def score_split(arrays: dict, far_names: list[str], examples: bool, seed: int, target_tpr: float = 0.95) -> dict:
    """Fit the unknown-image statistics as training does and evaluate every score on every set.

    With `examples`, also "best-on-examples": the score with the best AUROC on the examples, which is
    what `--unknown-dir` chose before the examples probe.
    """
    from effitune import ood

    train_labels = arrays["train_labels"]
    chosen = ood.stratified_sample(train_labels, ood.BANK_SIZE, seed)
    detector = ood.UnknownDetector.fit(arrays["train_features"][chosen], train_labels[chosen], arrays["val_logits"],
                                       arrays["val_features"], arrays["val_labels"], float(arrays["temperature"]),
                                       seed=seed, pooled_dim=int(arrays["pooled_dim"]))
    given = (arrays["set_examples_logits"], arrays["set_examples_features"]) if examples else None
    section = ood.calibrate(detector, arrays["val_logits"], arrays["val_features"], target_tpr, "auto", given, seed)
    known = (arrays["known_logits"], arrays["known_features"], arrays["known_labels"])
    result = {"score_used": detector.score_name, "test_accuracy": float(arrays["test_accuracy"]), "sets": {}}
    for name in ["unknown", *far_names]:
        report = ood.evaluate_arrays(detector, known, (arrays[f"set_{name}_logits"], arrays[f"set_{name}_features"]))
        if examples:
            before = max(section["example_auroc"], key=section["example_auroc"].get)
            report["scores"]["best-on-examples"] = report["scores"][before]
        result["sets"][name] = report["scores"]
    return result


def class_blocks(folder: Path) -> list[slice]:
    """Rows of each class folder in an embedded set (`embed` reads folders sorted, files sorted)."""
    counts = [len(list(sub.glob("*.png"))) for sub in sorted(p for p in folder.iterdir() if p.is_dir())]
    ends = np.cumsum(counts)
    return [slice(int(end - count), int(end)) for count, end in zip(counts, ends)]


def examples_of_the_other_class(arrays: dict, split: Path, seed: int, target_tpr: float = 0.95) -> dict:
    """Examples of one held-out class only, tested on the other held-out class: AUROC of `examples` and of
    the default score, and the rejected share, averaged over both directions. Does the probe learn
    "unlike the classes" or only "like these examples"?"""
    from effitune import ood

    given, tested = class_blocks(split / "examples"), class_blocks(split / "test-unknown")
    chosen = ood.stratified_sample(arrays["train_labels"], ood.BANK_SIZE, seed)
    known = (arrays["known_logits"], arrays["known_features"], arrays["known_labels"])
    rows = []
    for teach, test in ((0, 1), (1, 0)):
        detector = ood.UnknownDetector.fit(arrays["train_features"][chosen], arrays["train_labels"][chosen],
                                           arrays["val_logits"], arrays["val_features"], arrays["val_labels"],
                                           float(arrays["temperature"]), seed=seed, pooled_dim=int(arrays["pooled_dim"]))
        examples = (arrays["set_examples_logits"][given[teach]], arrays["set_examples_features"][given[teach]])
        section = ood.calibrate(detector, arrays["val_logits"], arrays["val_features"], target_tpr, "auto", examples,
                                seed)
        unknown = (arrays["set_unknown_logits"][tested[test]], arrays["set_unknown_features"][tested[test]])
        row = ood.evaluate_arrays(detector, known, unknown)["scores"]
        row["best-on-examples"] = row[max(section["example_auroc"], key=section["example_auroc"].get)]
        rows.append(row)
    names = ("examples", "best-on-examples", detector.default_score, "knn-frozen")
    return {score: {key: float(np.mean([row[score][key] for row in rows])) for key in ("auroc", "unknown_rejected")}
            for score in names}


def candidates(arrays: dict, far_names: list[str], seed: int) -> dict:
    """Near- and far-OOD AUROC of scores effitune does not ship (they did not beat its default here): ViM
    (Wang et al., 2022), relative Mahalanobis (Ren et al., 2021), the minimum of standardized energy and
    knn-frozen, and the examples probe joined with knn-frozen (the examples score before the ensemble
    became the default; it is shown with the examples of the held-out classes). Same statistics as
    `score_split` (the stratified train sample, validation)."""
    from scipy.special import logsumexp
    from effitune import ood

    width = int(arrays["pooled_dim"])
    chosen = ood.stratified_sample(arrays["train_labels"], ood.BANK_SIZE, seed)
    train, labels = arrays["train_features"][chosen, :width], arrays["train_labels"][chosen]
    detector = ood.UnknownDetector.fit(arrays["train_features"][chosen], labels, arrays["val_logits"],
                                       arrays["val_features"], arrays["val_labels"], float(arrays["temperature"]),
                                       seed=seed, pooled_dim=width)
    # ViM: the residual of the features outside their principal subspace, around the head's origin, as a
    # virtual logit against the energy; OpenOOD's dimension rule, capped by the sample
    weight, bias = arrays["head_weight"], arrays["head_bias"]
    origin = -np.linalg.pinv(weight) @ bias
    centred = train - origin
    dim = min(1000 if width >= 2048 else 512 if width >= 768 else width // 2, len(train) - 1)
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    null_space = vectors[:, np.argsort(eigenvalues)[::-1][dim:]]
    alpha = arrays["train_logits"][chosen].max(1).mean() / np.linalg.norm(centred @ null_space, axis=1).mean()
    if detector.prefix_bank is not None:
        detector.fit_probe(arrays["set_examples_features"], arrays["val_logits"], arrays["val_features"], seed)
    # relative Mahalanobis: class-conditional minus one Gaussian of all the training features
    normalized = ood.l2_normalize(train)
    overall = ood._shared_covariance(normalized - normalized.mean(0))
    centre = normalized.mean(0, keepdims=True)

    def mahalanobis_to(x, means, covariance):
        components, eigen, residual = covariance
        squared = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]
        px, pm = x @ components.T, means @ components.T
        inside = ood._weighted_squared_distance(px, pm, 1 / eigen)
        plain = ood._weighted_squared_distance(px, pm, np.ones_like(eigen))
        return inside + np.maximum(squared - plain, 0) / residual

    def raw(logits, features):
        pooled = features[:, :width]
        x = ood.l2_normalize(pooled)
        shared = (detector.components, detector.eigenvalues, detector.residual_variance)
        known_scores = detector.scores(logits, features)
        return {"vim": -np.linalg.norm((pooled - origin) @ null_space, axis=1) * alpha + logsumexp(logits, axis=1),
                "relative-mahalanobis": -(mahalanobis_to(x, detector.means, shared)
                                          - mahalanobis_to(x, centre, overall)).min(1),
                **known_scores, **({"probe": detector.probe_logit(features)} if detector.probe is not None else {})}

    val = raw(arrays["val_logits"], arrays["val_features"])
    spread = {name: ood._median_and_spread(values) for name, values in val.items()}

    def scored(logits, features):
        values = raw(logits, features)
        z = {name: (values[name] - spread[name][0]) / spread[name][1] for name in values}
        out = {"vim": values["vim"], "relative-mahalanobis": values["relative-mahalanobis"]}
        if "knn-frozen" in z:
            out["min(energy, knn-frozen)"] = np.minimum(z["energy"], z["knn-frozen"])
            out["examples probe joined with knn-frozen"] = np.minimum(z["probe"], z["knn-frozen"])
        return out

    known = scored(arrays["known_logits"], arrays["known_features"])
    result = {}
    for name in ["unknown", *far_names]:
        other = scored(arrays[f"set_{name}_logits"], arrays[f"set_{name}_features"])
        result[name] = {score: ood.ood_metrics(known[score], other[score])["auroc"] for score in known}
    return result


def summarize(results: list[dict], label: str) -> list[str]:
    """Markdown rows: mean +- standard deviation over the seeds, per score, of every metric."""
    lines = [f"\n### {label}: {len(results)} splits, test accuracy "
             f"{np.mean([r['test_accuracy'] for r in results]):.3f} +- {np.std([r['test_accuracy'] for r in results]):.3f};"
             f" auto chose: {', '.join(sorted({r['score_used'] for r in results}))}"]
    sets = list(results[0]["sets"])
    scores = list(results[0]["sets"]["unknown"])
    lines.append("| score | near AUROC | near FPR95 | near rejected | known accepted | "
                 + " | ".join(f"{name} AUROC" for name in sets[1:]) + " |")
    lines.append("|---" * (5 + len(sets) - 1) + "|")

    def cell(name: str, score: str, key: str) -> str:
        values = [r["sets"][name][score][key] for r in results]
        return f"{np.mean(values):.3f} +- {np.std(values):.3f}"

    for score in scores:
        used = "**" if all(r["score_used"] == score for r in results) else ""
        lines.append(f"| {used}{score}{used} | {cell('unknown', score, 'auroc')} | {cell('unknown', score, 'fpr_at_95_tpr')}"
                     f" | {cell('unknown', score, 'unknown_rejected')} | {cell('unknown', score, 'known_accepted')} | "
                     + " | ".join(cell(name, score, "auroc") for name in sets[1:]) + " |")
    chosen = [r["sets"]["unknown"][r["score_used"]] for r in results]
    lines.append(f"| auto's choice | {np.mean([c['auroc'] for c in chosen]):.3f} | "
                 f"{np.mean([c['fpr_at_95_tpr'] for c in chosen]):.3f} | "
                 f"{np.mean([c['unknown_rejected'] for c in chosen]):.3f} | "
                 f"{np.mean([c['known_accepted'] for c in chosen]):.3f} | "
                 + " | ".join(f"{np.mean([r['sets'][n][r['score_used']]['auroc'] for r in results]):.3f}"
                              for n in sets[1:]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/effitune-near-ood"))
    parser.add_argument("--domain", choices=("fashion", "digits"), default="fashion")
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--score-only", action="store_true", help="Only score splits already embedded.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="A training setting other than the default (e.g. train.label_smoothing=0); repeatable.")
    parser.add_argument("--target-tpr", type=float, default=0.95, help="unknown.target_tpr of the thresholds.")
    parser.add_argument("--json", type=Path, help="Also write every split's results here.")
    args = parser.parse_args()

    data = fashion_images() if args.domain == "fashion" else digits_images()
    domain_dir = args.work / args.domain
    far = far_sets(domain_dir, args.domain, data)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: {' '.join(sys.argv)}")
    plain, given, others, crossed = [], [], [], []
    for seed in args.seeds:
        split = domain_dir / ("-".join([f"{args.per_class}-s{seed}", *args.overrides]))
        cached = split / "arrays.npz"
        if not cached.is_file():
            if args.score_only:
                continue
            layout = prepare_split(split, args.domain, data, args.per_class, seed)
            arrays = embed_split(split, layout, far, dict(item.split("=", 1) for item in args.overrides))
            np.savez(cached, **arrays)
        arrays = dict(np.load(cached))
        held = json.loads((split / ".prepared").read_text())
        plain.append(score_split(arrays, list(far), False, seed, args.target_tpr))
        given.append(score_split(arrays, list(far), True, seed, args.target_tpr))
        others.append(candidates(arrays, list(far), seed))
        crossed.append(examples_of_the_other_class(arrays, split, seed, args.target_tpr))
        row = plain[-1]["sets"]["unknown"]
        print(f"seed {seed} (held out {', '.join(held)}; train {float(arrays['train_seconds']):.0f} s, test accuracy "
              f"{plain[-1]['test_accuracy']:.3f}): near AUROC " + ", ".join(f"{s} {v['auroc']:.3f}" for s, v in row.items()),
              flush=True)
    if not plain:
        parser.error("no split embedded yet: run without --score-only first")
    label = f"{args.domain}, {args.per_class} per class, target TPR {args.target_tpr}" + "".join(f", {item}" for item in args.overrides)
    lines = summarize(plain, label) + summarize(given, f"{label}, with {EXAMPLES_PER_CLASS} unknown examples per "
                                                        "held-out class (train part)")
    sets = ["unknown", *far]
    lines += [f"\n### {label}: candidates not shipped (AUROC, mean +- spread)",
              "| score | " + " | ".join("near" if n == "unknown" else n for n in sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for score in others[0]["unknown"]:
        lines.append(f"| {score} | " + " | ".join(f"{np.mean([o[n][score] for o in others]):.3f} +- "
                                                  f"{np.std([o[n][score] for o in others]):.3f}" for n in sets) + " |")
    lines += [f"\n### {label}: examples of one held-out class, tested on the other (mean of both directions)",
              "| score | near AUROC | near rejected |", "|---|---|---|"]
    for score in crossed[0]:
        lines.append(f"| {score} | " + " | ".join(f"{np.mean([c[score][key] for c in crossed]):.3f} +- "
                                                  f"{np.std([c[score][key] for c in crossed]):.3f}"
                                                  for key in ("auroc", "unknown_rejected")) + " |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "examples": given, "candidates": others,
                                               "examples_of_the_other_class": crossed}, indent=1))


if __name__ == "__main__":
    main()
