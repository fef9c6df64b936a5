"""The whole job, composed: scan -> split -> fit (training/) -> calibrate -> unknown images -> test -> bundle
-> report, with `RUN/timings.json` accounting for every second of it.

`train()` is what `effitune train` and `effitune demo` call; a notebook calls it the same way. The
steps are the lower layers' (data/, training/, evaluate/, ood, predict); this module only orders
them, and owns the run folder's life: opening, resuming, the bundle's metadata, the timings.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import bundle as bundles
from . import distributed, ood
from . import timings as run_timings
from .config import Config, as_config, load_config
from .data.datamodule import ImageDataModule
from .data.audit import duplicate_groups, label_conflict_notice
from .data.manifest import manifest_hash, manifest_order, read_manifest, split_counts, write_manifest
from .data.scan import load_ok_records, scan
from .data.split import split_records
from .errors import EffituneWarning, Notify, UserError, notifier
from .evaluate.calibration import fit_temperature, reliability
from .evaluate.metrics import classification_metrics
from .evaluate.report import report_after_training
from .export.quantize import refit_int8_thresholds
from .models.backbones import feature_dim
from .predict import Embedded, Predictor, embed, expand_sources
from .runtime.batching import softmax
from .training.loggers import require_loggers
from .training.run import Fitted, RunPaths, device_for, fit, image_cache, plan_for, quiet_lightning, scan_cache_plan
from .training.stages import Phase


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path
    metrics: dict
    phases: list[dict] = field(default_factory=list)
    report: Path | None = None  # report.html (None when it could not be written, or not asked for)
    timings: dict = field(default_factory=dict)  # {step: seconds, ..., "wall_seconds"}: RUN/timings.json



def train(data: str | Path | None = None, *, out: str | Path = "runs/run", config: Config | dict | str | None = None,
          manifest: str | Path | None = None, resume: str | Path | None = None,
          cache_root: str | Path | None = None, progress: bool = True,
          unknown_dir: str | Path | None = None, features_dir: str | Path | None = None,
          callbacks: tuple = (), finish: bool = True, notify: Notify | None = None) -> TrainResult:
    """`config`: a Config, a dict ({"train": {"batch_size": 32}} or {"train.stage1.epochs": 5}) or a YAML path.
    `unknown_dir`: example images of no class; the unknown-image score is then chosen on them.

    For tuning trials: `features_dir` shares one frozen-prefix cache between runs on the same manifest,
    `callbacks` (Lightning) join every phase, and `finish=False` stops after the phases (validation
    accuracy only: no test split, bundle or report).

    Several devices (`train.devices`, `train.num_nodes`): under torchrun or srun every process runs
    this; without a launcher it starts the processes itself and returns rank 0's result (see
    `effitune.distributed`). Rank 0 alone writes the run's files; the other ranks return no metrics.

    `notify`: hears one line per step (default: the `effitune` logger's INFO); what needs the user's
    attention is an `EffituneWarning`. `resume` continues with the run's saved settings, so it takes
    neither `data`, `config` nor `manifest`.
    """
    config = None if config is None else as_config(config)  # a dict or a YAML path from a notebook
    arguments = dict(locals())  # every parameter, for the processes `distributed.launch` starts
    started = time.perf_counter()
    timer = run_timings.Timings(started)
    _check_resume(resume, data=data, config=config, manifest=manifest)
    _check_unknown_dir(unknown_dir)
    effective = _saved_config(resume) if resume is not None else config or Config()
    require_loggers(effective.train.logger)
    quiet_lightning()
    plan = plan_for(effective)
    say = notifier(notify)
    if plan.launch == "self":
        say(f"starting {plan.per_node} training processes on this machine ({plan.strategy})")
        return distributed.launch(train, plan.per_node, **arguments)
    distributed.init(plan.device)
    say = say if distributed.is_main() else _silent
    paths, config, rows = _open_run(data, out, config, manifest, resume, timer, say, cache_root)
    paths.shared_features = Path(features_dir) if features_dir else None
    fitted = fit(rows, config, paths, cache_root=cache_root, progress=progress, callbacks=callbacks, started=started,
                 timer=timer, notify=say)
    trained = round(time.perf_counter() - started, 1)  # scan, split, caches and phases: before any evaluation
    phase_log = fitted.phases
    if not finish:
        best = max(phase_log, key=lambda p: p["val_acc"])
        return TrainResult(paths.root, paths.model, {"val_acc": best["val_acc"],
                                                     "wall_seconds": round(time.perf_counter() - started, 1)},
                           phase_log)
    if not distributed.is_main():  # rank 0 alone evaluates and writes the bundle; this rank is done
        return TrainResult(paths.root, paths.model, {}, phase_log)
    metrics, (logits, features) = _evaluate_and_bundle(fitted, config, paths, started, unknown_dir, trained, timer,
                                                       say)
    embedded = Embedded([row["path"] for row in rows], logits, features)  # the report reuses the pass
    timer.write(paths.root)  # the report shows the steps up to it
    with timer.step("report"):
        report = report_after_training(paths.root, device=device_for(config),
                                       cache=fitted.datamodule.cache.folder.parent, embedded=embedded)  # never raises
    if report is not None:
        say(f"report: {report}")
    timer.write(paths.root)
    return TrainResult(paths.root, paths.model, metrics, phase_log, report, timer.to_dict())


# --- opening a run ------------------------------------------------------------------------------

def _check_resume(resume, **given) -> None:
    """`resume` continues with the settings the run started with: anything given beside it would be ignored."""
    named = [name for name, value in given.items() if value is not None]
    if resume is not None and named:
        raise UserError(f"resume={str(resume)!r} continues that run with the settings it started with; "
                        f"{', '.join(named)} cannot change them. Leave them out, or start a new run in another folder.")


def _silent(message: str) -> None:
    """Ranks other than 0 say nothing (rank 0 speaks for the run)."""


def _check_unknown_dir(unknown_dir) -> None:
    """Example images of no class are read at the end of a run: a wrong folder is said before it starts."""
    if unknown_dir is None:
        return
    if not Path(unknown_dir).is_dir():
        raise UserError(f"--unknown-dir {unknown_dir} is not a folder. Pass a folder of example images that belong "
                        "to no class, or leave the option out.")
    if next(expand_sources([unknown_dir]), None) is None:
        raise UserError(f"--unknown-dir {unknown_dir} holds no images. Put example images of no class there, or "
                        "leave the option out.")


def _open_run(data, out, config, manifest, resume, timer=None, say: Notify | None = None, cache_root=None
              ) -> tuple[RunPaths, Config, list[dict]]:
    if resume is not None:
        paths = RunPaths(resume)
        if not paths.config.is_file() or not paths.manifest.is_file():
            raise UserError(f"{paths.root} is not an effitune run folder to resume (no config.yaml/manifest.csv).")
        if (paths.root / "metrics.json").is_file() and (paths.model / bundles.META_FILE).is_file():
            raise UserError(f"{paths.root} is finished already: its bundle is {paths.model}. Nothing to resume; "
                            "train again with another --out.")
        return paths, load_config(paths.config), read_manifest(paths.manifest)
    paths = RunPaths(out)
    if paths.state.is_file():
        raise UserError(f"{paths.root} already holds a run. Continue it with `--resume {paths.root}` or pass "
                        "another --out folder.")
    created = not paths.root.exists()
    paths.root.mkdir(parents=True, exist_ok=True)
    config = config or Config()
    try:
        rows = sorted(read_manifest(manifest) if manifest else scan_and_split(data, paths, config, timer, say,
                                                                              cache_root),
                      key=manifest_order)
        _check_splits(rows, manifest or data)
    except (UserError, KeyboardInterrupt):
        if created and not any(paths.root.iterdir()):
            paths.root.rmdir()  # a refused run leaves no empty folder behind (one inside the data would be a class)
        raise
    distributed.on_main(write_manifest, rows, paths.manifest)
    return paths, config, rows


def _check_splits(rows: list[dict], source) -> None:
    """Training needs train and val images of every class; a missing test split or class is said, not fatal."""
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for row in rows:
        by_split[row["split"]].add(row["label"])
    classes = sorted(set().union(*by_split.values()))
    if len(by_split["train"]) < 2:
        raise UserError(f"{source}: the split has training images of {len(by_split['train'])} class(es); a "
                        "classifier needs at least two. Check the manifest's split column.")
    if not by_split["val"]:
        raise UserError(f"{source}: the split has no validation images; training needs them (early stopping, "
                        "calibration, the unknown-image threshold). Keep data.val above 0 (default 0.15), or add "
                        "rows with split 'val' to the manifest.")
    untrained = [name for name in classes if name not in by_split["train"]]
    if untrained:
        raise UserError(f"{source}: class(es) {', '.join(map(repr, untrained[:5]))} have no training images, so "
                        "the model could never predict them. Add training images or remove those rows.")
    for name in (name for name in classes if name not in by_split["val"]):
        warnings.warn(f"class {name!r} has no validation images: its accuracy is not checked while training and its "
                      "unknown-image threshold rests on the other classes.", EffituneWarning, stacklevel=4)
    if not by_split["test"]:
        warnings.warn("the split has no test images: the model will not be tested on held-out images (keep data.test "
                      "above 0, default 0.15, to measure it).", EffituneWarning, stacklevel=4)


def scan_and_split(data, paths: RunPaths, config: Config, timer=None, say: Notify | None = None,
                   cache_root: str | Path | None = None) -> list[dict]:
    """Scan `data` into the run folder and split it duplicate-aware (`train` and `tune` alike).

    The scan's one decode of each image also fills the resize-once cache under `cache_root` at the
    size training will use, where that is known (`scan_cache_plan`), so training decodes it no more.
    """
    if data is None:
        raise UserError("Nothing to train on: pass a DATA folder (one subfolder per class), a CSV, or --manifest.")
    timer = timer or run_timings.Timings()
    size, from_side = scan_cache_plan(config)
    with timer.step("scan"):
        result = scan(data, out=paths.root, config=config.data, workers=config.data.workers, sharded=True,
                      cache=image_cache(config, cache_root, size) if size else None, cache_from_side=from_side)
    for notice in result.notices:
        warnings.warn(notice, EffituneWarning, stacklevel=4)

    def split() -> list[dict]:
        records = load_ok_records(result.records_path)
        groups = duplicate_groups(records, config.data.near_duplicate_distance)
        conflict = label_conflict_notice(records, groups, data)
        if conflict:
            warnings.warn(conflict, EffituneWarning, stacklevel=5)
        return split_records(records, val=config.data.val, test=config.data.test, seed=config.data.seed,
                             groups=groups)
    with timer.step("split"):
        return distributed.on_main(split)  # one split, made once, for every rank


def _saved_config(resume) -> Config:
    """The config a run to resume was started with (its processes are planned from it)."""
    path = RunPaths(resume).config
    return load_config(path) if path.is_file() else Config()  # no run there: _open_run says so


# --- calibration, test split and bundle ----------------------------------------------------------------------

def _pass_over_every_image(predictor, datamodule: ImageDataModule, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of every manifest row (`Predictor.run_pass`: on a CPU in ONNX Runtime when it
    reproduces PyTorch on 32 val images, train images without a val split)."""
    cache, keys = datamodule.cache, datamodule.keys
    sample = cache.stack((datamodule.parts["val"][0] or keys)[:32])
    return predictor.run_pass((cache.stack(keys[i:i + chunk]) for i in range(0, len(keys), chunk)), len(keys), sample)


def _evaluate_and_bundle(fitted: Fitted, config: Config, paths: RunPaths, started: float, unknown_dir=None,
                         train_seconds: float | None = None, timer=None, say: Notify | None = None) -> tuple[dict, tuple]:
    """Calibrate, fit the unknown-image score, test, write the bundle; return (metrics, (logits, features)).

    The network sees every manifest row once, in manifest order: calibration (val), the unknown-image
    statistics (a train sample), the test metrics and the report after training all read that pass.
    """
    network, datamodule, classes, phase_log = fitted.network, fitted.datamodule, fitted.classes, fitted.phases
    say = notifier(say)
    meta = {
        "classes": classes, "backbone": config.model.backbone, "weight_source": fitted.weight_source,
        "preprocessing": bundles.Preprocessing(config.data.image_size, tuple(network.mean.flatten().tolist()),
                                               tuple(network.std.flatten().tolist())).to_dict(),
        "config": config.to_dict(), "manifest_sha1": manifest_hash(paths.manifest),
        "split_counts": split_counts(read_manifest(paths.manifest)), "phases": phase_log,
        "embedding": _embedding(network, phase_log),
    }
    staging = paths.root / "model.staging"
    bundles.save_bundle(staging, network.state_dict(), meta, extra_files={"history.csv": paths.history})
    timer = timer or run_timings.Timings()
    with timer.step("pass after the phases"):
        predictor = Predictor(staging, device=device_for(config))
        logits, features = _pass_over_every_image(predictor, datamodule)
    with timer.step("calibration, unknown images, test, bundle"):
        return _calibrate_test_and_bundle(predictor, logits, features, datamodule, config, paths, classes, staging,
                                          started, unknown_dir, train_seconds, say)


def _calibrate_test_and_bundle(predictor, logits, features, datamodule, config, paths, classes, staging, started,
                               unknown_dir, train_seconds, say: Notify) -> tuple[dict, tuple]:
    by_split = {name: (logits[at], features[at]) for name, at in datamodule.positions.items() if name != "train"}
    val_logits, val_features = by_split["val"]
    val_labels = datamodule.labels("val")
    temperature = fit_temperature(val_logits, val_labels)
    calibration = {"temperature": temperature,
                   "val_ece_before": reliability(softmax(val_logits), val_labels)["ece"] if len(val_labels) else None,
                   "val_ece_after": reliability(softmax(val_logits, temperature), val_labels)["ece"]
                   if len(val_labels) else None}
    _fit_unknown(predictor, datamodule, config, staging, temperature, features, by_split["val"], unknown_dir, say)
    keys, labels = datamodule.parts["test"]
    metrics = {}
    if len(keys):
        test_logits, test_features = by_split["test"]
        metrics = classification_metrics(softmax(test_logits, temperature), labels, classes)
        metrics["test_ece"] = reliability(softmax(test_logits, temperature), labels)["ece"]
        metrics.update(_unknown_on_test(staging, test_logits, test_features, labels))
    metrics["train_seconds"] = train_seconds  # up to the end of the phases (the rest: calibration, test, bundle)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    bundles.update_meta(staging, temperature=temperature, calibration=calibration,
                        metrics={k: v for k, v in metrics.items() if k != "confusion"})
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (paths.root / "metrics.json").write_text(json.dumps(metrics, indent=2))
    bundles.replace_bundle(staging, paths.model)  # the finished bundle appears in one rename
    tested = f"test accuracy {metrics['accuracy']:.4f} on {len(keys)} held-out images" if len(keys) \
        else "no test images: not tested"
    say(f"{tested}; bundle: {paths.model}")
    return metrics, (logits, features)


def _embedding(network, phase_log: list[dict]) -> dict:
    """Which frozen prefix the bundle's features include: the input of the stages the best phase trained.

    Its pooled output is ImageNet's, untouched by training: unknown images that fine-tuning pulls
    towards the classes stay apart there (docs/benchmarks.md, "Unknown images").
    """
    best = Phase.from_name(next(entry["phase"] for entry in phase_log if entry.get("best")))
    if best.depth is not None and best.depth < 0:  # every layer trained: nothing is left untouched
        return {}
    depth = best.depth or 0  # stage 1: the whole feature stack stayed frozen
    with torch.inference_mode():
        prefix_dim = network.cpu().eval().prefix(torch.zeros(1, 3, 64, 64), depth).shape[1]
    return {"frozen_depth": depth, "pooled_dim": feature_dim(network.backbone), "prefix_dim": int(prefix_dim)}


def _fit_unknown(predictor, datamodule, config, staging, temperature, features, val, unknown_dir, say: Notify) -> None:
    """Unknown-image statistics from a class-stratified train sample; the threshold from the val split.

    `features`: every manifest row's (the pass after the phases); `val`: the val split's (logits, features).
    """
    labels = datamodule.labels("train")
    if not len(val[0]) or not len(labels):
        warnings.warn("no validation images: the bundle gets no unknown-image threshold", EffituneWarning, stacklevel=2)
        return
    chosen = ood.stratified_sample(labels, ood.BANK_SIZE, config.data.seed)
    examples = _logits_and_features(embed(predictor, [unknown_dir])) if unknown_dir else None
    sample = features[datamodule.positions["train"][chosen]]  # copies the sample only, not every train row
    section = ood.fit_and_attach(staging, temperature, (sample, labels[chosen]),
                                 (*val, datamodule.labels("val")), config.unknown.target_tpr, config.unknown.score,
                                 examples, seed=config.data.seed, pooled_dim=predictor.pooled_dim)
    say(f"unknown images: score '{section['score']}' ({section['selected_by']}), threshold "
        f"{section['threshold']:.4f} keeps {section['val_tpr']:.1%} of validation images")


def _unknown_on_test(staging, logits, features, labels) -> dict:
    """Share of test images the unknown threshold accepts, and the accuracy on those."""
    detector = ood.load_detector(staging, bundles.read_meta(staging))
    if detector is None:
        return {}
    scores = detector.score(logits, features)
    return {f"test_{k}": v for k, v in ood.acceptance(scores, detector.section["threshold"],
                                                       logits.argmax(1) == labels).items()}


def _logits_and_features(embedded: Embedded) -> tuple[np.ndarray, np.ndarray]:
    return embedded.logits, embedded.features


# --- a bundle's unknown-image statistics, afresh ----------------------------------------------------

def calibrate_unknown(bundle: str | Path, manifest: str | Path, unknown_dir: str | Path | None = None,
                      target_tpr: float = 0.95, score: str = "auto", bank_size: int = ood.BANK_SIZE) -> dict:
    """Add (or renew) a bundle's unknown-image statistics from its run's manifest (train + val splits);
    an INT8 graph in the bundle gets its own thresholds again.

    `unknown_dir`: example images of no class (`ood.calibrate`: 10 or more teach the examples probe),
    e.g. images a deployed model wrongly took for a class: no retraining needed.
    """
    _check_unknown_dir(unknown_dir)
    predictor = Predictor(bundle)
    rows = read_manifest(manifest)
    foreign = sorted({r["label"] for r in rows} - set(predictor.classes))
    if foreign:
        raise UserError(f"{manifest} has classes the bundle {bundle} does not know ({', '.join(foreign[:3])}): "
                        "pass the manifest.csv of the run that trained this bundle.")
    label_of = {r["path"]: predictor.classes.index(r["label"]) for r in rows}
    train_paths = [r["path"] for r in rows if r["split"] == "train"]
    train_paths = [train_paths[i] for i in ood.stratified_sample([label_of[p] for p in train_paths], bank_size)]
    train = embed(predictor, train_paths)
    train_labels = np.array([label_of[p] for p in train.paths])
    val = embed(predictor, [r["path"] for r in rows if r["split"] == "val"])
    val = (val.logits, val.features, np.array([label_of[p] for p in val.paths]))
    examples = _logits_and_features(embed(predictor, [unknown_dir])) if unknown_dir else None
    section = ood.fit_and_attach(bundle, predictor.temperature, (train.features, train_labels), val, target_tpr, score,
                             examples, bank_size=bank_size, pooled_dim=predictor.pooled_dim)
    return refit_int8_thresholds(bundle) or section


