"""effitune (defaults) vs two classic baselines on the same Fashion-MNIST images, in one run.

For each subset size (images per class, drawn from the official training part) effitune scans,
splits (70/15/15), trains with its defaults and reports test accuracy after stage 1 and after stage 2.
The baselines are fitted on the same training split (their C chosen on the same validation split):
raw-pixel logistic regression and HOG + linear SVM (scikit-image + scikit-learn). Everything is
scored on the same held-out test split, and also on 2,000 images of the official test part that no
method saw.

    python benchmarks/fashion_mnist.py --per-class 150 500 --out /tmp/fmnist-bench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import hog
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import effitune
from effitune.data.manifest import read_manifest
from effitune.datasets import FASHION_MNIST_CLASSES, export_fashion_mnist, load_fashion_mnist
from effitune.evaluate.metrics import classification_metrics
from effitune.predict import Predictor
from effitune.runtime.batching import softmax


def pixels(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255 for p in paths])


def hog_features(images: np.ndarray) -> np.ndarray:
    return np.stack([hog(im.reshape(28, 28), orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2))
                     for im in images])


def fit_best(make, grid, x_train, y_train, x_val, y_val):
    """Pick C on the validation split, like effitune's early stopping picks epochs there."""
    scaler = StandardScaler().fit(x_train)
    best = max(((make(c).fit(scaler.transform(x_train), y_train), c) for c in grid),
               key=lambda mc: mc[0].score(scaler.transform(x_val), y_val))
    return lambda x: best[0].predict(scaler.transform(x)), best[1]


def baselines(parts: dict, official: tuple[np.ndarray, np.ndarray]) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = parts["train"], parts["val"], parts["test"]
    xo, yo = official
    out = {}
    started = time.perf_counter()
    predict, c = fit_best(lambda c: LogisticRegression(C=c, max_iter=2000), [0.01, 0.1, 1.0], xtr, ytr, xva, yva)
    out["logreg_pixels"] = {"test": float((predict(xte) == yte).mean()), "official_test": float((predict(xo) == yo).mean()),
                            "C": c, "seconds": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    htr, hva, hte, ho = (hog_features(x) for x in (xtr, xva, xte, xo))
    predict, c = fit_best(lambda c: LinearSVC(C=c, max_iter=5000), [0.001, 0.01, 0.1], htr, ytr, hva, yva)
    out["hog_linear_svm"] = {"test": float((predict(hte) == yte).mean()), "official_test": float((predict(ho) == yo).mean()),
                             "C": c, "seconds": round(time.perf_counter() - started, 1)}
    return out


def effitune_scores(run_dir: Path, official_images: np.ndarray, official_labels: np.ndarray) -> dict:
    """Test accuracy of the final bundle and of the stage-1 weights, on the split test and the official sample."""
    meta = json.loads((run_dir / "model" / "effitune.json").read_text())
    predictor = Predictor(run_dir / "model")
    rows = [r for r in read_manifest(run_dir / "manifest.csv") if r["split"] == "test"]
    test_images = np.stack([predictor.preprocess(r["path"]) for r in rows])
    test_labels = np.array([predictor.classes.index(r["label"]) for r in rows])
    official = np.stack([predictor.preprocess(_png_bytes(im)) for im in official_images])
    order = [predictor.classes.index(name) for name in FASHION_MNIST_CLASSES]
    official_labels = np.array([order[y] for y in official_labels])
    result = {"phases": {p["phase"]: p["val_acc"] for p in meta["phases"]}}
    from safetensors.torch import load_file
    final_state = {k: v.clone() for k, v in predictor.network.state_dict().items()}
    for name, state in (("stage1", load_file(run_dir / "phases" / "stage1.safetensors")), ("final", final_state)):
        predictor.network.load_state_dict(state)
        result[name] = {
            "test": classification_metrics(softmax(predictor.logits(test_images)), test_labels, predictor.classes)["accuracy"],
            "official_test": float((predictor.logits(official).argmax(1) == official_labels).mean()),
        }
    result["best_phase"] = next(p["phase"] for p in meta["phases"] if p.get("best"))
    result["wall_seconds"] = meta["metrics"]["wall_seconds"]
    return result


def _png_bytes(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(array, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def split_arrays(run_dir: Path) -> dict:
    rows = read_manifest(run_dir / "manifest.csv")
    classes = sorted({r["label"] for r in rows})
    parts = {}
    for part in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == part]
        parts[part] = (pixels([r["path"] for r in chosen]), np.array([classes.index(r["label"]) for r in chosen]))
    return parts, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[150, 500])
    parser.add_argument("--out", type=Path, default=Path("/tmp/effitune-fmnist-bench"))
    parser.add_argument("--official", type=int, default=2000, help="official test images scored by every method")
    args = parser.parse_args()
    test_images, test_labels = load_fashion_mnist("test")
    pick = np.random.default_rng(0).choice(len(test_labels), size=args.official, replace=False)
    official_images, official_labels = test_images[pick], test_labels[pick]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "runs": {}}
    for n in args.per_class:
        data = export_fashion_mnist(args.out / f"data{n}", per_class=n, seed=1)
        run_dir = args.out / f"run{n}"
        if not (run_dir / "model" / "effitune.json").is_file():
            effitune.train(data, out=run_dir)  # the defaults, nothing tuned
        parts, classes = split_arrays(run_dir)
        order = [classes.index(name) for name in FASHION_MNIST_CLASSES]
        result = {"effitune": effitune_scores(run_dir, official_images, official_labels),
                  **baselines(parts, (official_images.reshape(len(pick), -1).astype(np.float32) / 255,
                                      np.array([order[y] for y in official_labels])))}
        result["sizes"] = {part: int(len(parts[part][1])) for part in parts}
        report["runs"][str(n)] = result
        print(json.dumps({n: result}, indent=2), flush=True)
    summary = ["| images/class | split sizes (train/val/test) | logreg pixels | HOG + linear SVM | effitune stage 1 | "
               "effitune final (best phase) | effitune wall |", "|---|---|---|---|---|---|---|"]
    for n, r in report["runs"].items():
        e = r["effitune"]
        summary.append(f"| {n} | {r['sizes']['train']}/{r['sizes']['val']}/{r['sizes']['test']} | "
                       f"{r['logreg_pixels']['test']:.3f} ({r['logreg_pixels']['official_test']:.3f}) | "
                       f"{r['hog_linear_svm']['test']:.3f} ({r['hog_linear_svm']['official_test']:.3f}) | "
                       f"{e['stage1']['test']:.3f} ({e['stage1']['official_test']:.3f}) | "
                       f"{e['final']['test']:.3f} ({e['final']['official_test']:.3f}, {e['best_phase']}) | "
                       f"{e['wall_seconds']:.0f} s |")
    print("\n".join(summary))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
