"""`effitune train`: scan -> split -> cache -> stage 1 -> stage 2 (auto depth) -> test -> bundle.

Readable top to bottom: `train()` lists the steps; each step is a small function below it. A run
lives in its own folder (config.yaml, manifest.csv, history.csv, state.json, model/), and
`train(resume=RUN_DIR)` continues an interrupted run from its last finished phase and last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.markup import escape
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .. import bundle as bundles
from .. import distributed
from .. import timings as run_timings
from ..config import Config, StageConfig, as_config, config_from_dict, load_config, save_config
from ..data.batches import ImageBatches
from ..data.cache import ImageCache
from ..data.datamodule import ActivationDataset, ImageDataModule, class_weights, collate_batched
from ..data.split import manifest_hash, manifest_order, read_manifest, split_counts, split_records, write_manifest
from ..errors import UserError
from ..evaluate.report import Embedded, report_after_training
from ..models.backbones import create_backbone, feature_dim
from ..models.network import Network
from .callbacks import HistoryWriter, SetEpoch
from .features import POOLED, boundary_name, compute_activations
from .loggers import make_loggers, require_loggers
from .module import Optimization, PhaseModule
from . import recipe
from .stages import Phase

console = Console(stderr=True)


def _quiet_lightning() -> None:
    """Keep the console for what matters: Lightning's banner lines, tips and known-benign warnings go."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen BN is on purpose
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # cached tensors need none


@dataclass
class RunPaths:
    root: Path
    shared_features: Path | None = None  # `effitune tune`: trials share one frozen-prefix cache

    def __post_init__(self):
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    manifest = property(lambda self: self.root / "manifest.csv")
    history = property(lambda self: self.root / "history.csv")
    state = property(lambda self: self.root / "state.json")
    phases = property(lambda self: self.root / "phases")
    checkpoints = property(lambda self: self.root / "checkpoints")
    features = property(lambda self: self.shared_features or self.root / "features")
    model = property(lambda self: self.root / "model")


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path
    metrics: dict
    phases: list[dict] = field(default_factory=list)
    report: Path | None = None  # report.html (None when it could not be written, or not asked for)
    timings: dict = field(default_factory=dict)  # {step: seconds, ..., "wall_seconds"}: RUN/timings.json


def default_cache_root() -> Path:
    return Path(os.environ.get("EFFITUNE_CACHE", Path.home() / ".cache" / "effitune"))


def train(data: str | Path | None = None, *, out: str | Path = "runs/run", config: Config | dict | str | None = None,
          manifest: str | Path | None = None, resume: str | Path | None = None,
          cache_root: str | Path | None = None, progress: bool = True,
          unknown_dir: str | Path | None = None, features_dir: str | Path | None = None,
          callbacks: tuple = (), finish: bool = True) -> TrainResult:
    """`config`: a Config, a dict ({"train": {"batch_size": 32}} or {"train.stage1.epochs": 5}) or a YAML path.
    `unknown_dir`: example images of no class; the unknown-image score is then chosen on them.

    For tuning trials: `features_dir` shares one frozen-prefix cache between runs on the same manifest,
    `callbacks` (Lightning) join every phase, and `finish=False` stops after the phases (validation
    accuracy only: no test split, bundle or report).

    Several devices (`train.devices`, `train.num_nodes`): under torchrun or srun every process runs
    this; without a launcher it starts the processes itself and returns rank 0's result (see
    `effitune.distributed`). Rank 0 alone writes the run's files; the other ranks return no metrics.
    """
    config = None if config is None else as_config(config)  # a dict or a YAML path from a notebook
    arguments = dict(locals())  # every parameter, for the processes `distributed.launch` starts
    started = time.perf_counter()
    timer = run_timings.Timings(started)
    _check_unknown_dir(unknown_dir)
    effective = _saved_config(resume) if resume is not None else config or Config()
    require_loggers(effective.train.logger)
    _quiet_lightning()
    plan = _plan(effective)
    if plan.launch == "self":
        console.print(f"starting {plan.per_node} training processes on this machine ({plan.strategy})")
        return distributed.launch(train, plan.per_node, **arguments)
    distributed.init(plan.device)
    console.quiet = not distributed.is_main()
    paths, config, rows = _open_run(data, out, config, manifest, resume, timer)
    paths.shared_features = Path(features_dir) if features_dir else None
    classes = sorted({row["label"] for row in rows})
    with timer.step("build network"):
        network, weight_source = _build_network(config, len(classes))
    config.data.image_size = config.data.image_size or choose_image_size(rows, network, _device(config))
    n_train = sum(row["split"] == "train" for row in rows)
    _fill_epochs(config, n_train, _stage2_depths(config, network, n_train))
    config.train.batch_size = config.train.batch_size or (256 if _device(config) == "cuda" else 64)
    distributed.on_main(save_config, config, paths.config)
    cache = ImageCache(cache_root or default_cache_root() / "images", config.data.image_size,
                       max_pixels=config.data.max_pixels)
    console.print(f"[bold]effitune[/] {len(rows)} images, {len(classes)} classes, {config.model.backbone} "
                  f"@ {config.data.image_size}px, weights: {escape(str(weight_source))}")
    with timer.step("resize cache"):
        keys = _cache_images(cache, rows, config)
    datamodule = ImageDataModule(rows, keys, classes, cache, batch_size=config.train.batch_size,
                                 augment=config.data.augment, balance=config.data.balance,
                                 workers=config.data.workers, seed=config.data.seed,
                                 device_augment=_device(config) == "cuda")
    phase_log = _train_phases(network, datamodule, config, paths, started, progress, callbacks, timer)
    trained = round(time.perf_counter() - started, 1)  # scan, split, caches and phases: before any evaluation
    _write_shares(paths)
    if not finish:
        best = max(phase_log, key=lambda p: p["val_acc"])
        return TrainResult(paths.root, paths.model, {"val_acc": best["val_acc"],
                                                     "wall_seconds": round(time.perf_counter() - started, 1)},
                           phase_log)
    if not distributed.is_main():  # rank 0 alone evaluates and writes the bundle; this rank is done
        return TrainResult(paths.root, paths.model, {}, phase_log)
    metrics, (logits, features) = _evaluate_and_bundle(network, datamodule, config, paths, classes, weight_source,
                                                       phase_log, started, unknown_dir, trained, timer)
    embedded = Embedded([row["path"] for row in rows], logits, features)  # the report reuses the pass
    timer.write(paths.root)  # the report shows the steps up to it
    with timer.step("report"):
        report = report_after_training(paths.root, device=_device(config), cache=cache.folder.parent,
                                       embedded=embedded)  # never raises
    timer.write(paths.root)
    return TrainResult(paths.root, paths.model, metrics, phase_log, report, timer.to_dict())


# --- opening a run ------------------------------------------------------------------------------

def _check_unknown_dir(unknown_dir) -> None:
    """Example images of no class are read at the end of a run: a wrong folder is said before it starts."""
    from ..predict import expand_sources

    if unknown_dir is None:
        return
    if not Path(unknown_dir).is_dir():
        raise UserError(f"--unknown-dir {unknown_dir} is not a folder. Pass a folder of example images that belong "
                        "to no class, or leave the option out.")
    if next(expand_sources([unknown_dir]), None) is None:
        raise UserError(f"--unknown-dir {unknown_dir} holds no images. Put example images of no class there, or "
                        "leave the option out.")


def _open_run(data, out, config, manifest, resume, timer=None) -> tuple[RunPaths, Config, list[dict]]:
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
        rows = sorted(read_manifest(manifest) if manifest else _scan_and_split(data, paths, config, timer),
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
        console.print(f"[yellow]warning:[/] class {escape(repr(name))} has no validation images: its accuracy is not "
                      "checked while training and its unknown-image threshold rests on the other classes.",
                      highlight=False, soft_wrap=True)
    if not by_split["test"]:
        console.print("[yellow]warning:[/] the split has no test images: the model will not be tested on held-out "
                      "images (keep data.test above 0, default 0.15, to measure it).", highlight=False, soft_wrap=True)


def _scan_and_split(data, paths: RunPaths, config: Config, timer=None) -> list[dict]:
    from ..data.audit import duplicate_groups, label_conflict_notice
    from ..data.scan import load_ok_records, scan

    if data is None:
        raise UserError("Nothing to train on: pass a DATA folder (one subfolder per class), a CSV, or --manifest.")
    timer = timer or run_timings.Timings()
    with timer.step("scan"):
        result = scan(data, out=paths.root, config=config.data, workers=config.data.workers, sharded=True)
    for notice in result.notices:
        console.print(f"[yellow]warning:[/] {escape(notice)}", highlight=False)

    def split() -> list[dict]:
        records = load_ok_records(result.records_path)
        groups = duplicate_groups(records, config.data.near_duplicate_distance)
        conflict = label_conflict_notice(records, groups, data)
        if conflict:
            console.print(f"[yellow]warning:[/] {escape(conflict)}", highlight=False, soft_wrap=True)
        return split_records(records, val=config.data.val, test=config.data.test, seed=config.data.seed,
                             groups=groups)
    with timer.step("split"):
        return distributed.on_main(split)  # one split, made once, for every rank


def choose_image_size(rows: list[dict], network: Network, device: str = "cpu") -> int:
    """The backbone's native size for photos; for small images a few times their size (`recipe`)."""
    native = int(network.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    short_side = statistics.median(min(row["width"], row["height"]) for row in rows)
    if short_side >= native:
        return native
    return recipe.small_image_size(short_side, native, device)


def _stage2_depths(config: Config, network: Network, n_train: int) -> list[int]:
    return recipe.auto_depths(config.train.unfreeze, config.train.max_unfreeze, network.num_stages, _device(config),
                              n_train)


def _fill_epochs(config: Config, n_train: int, depths: list[int] | None = None) -> None:
    """Small data sets need more passes; early stopping ends a phase sooner when it plateaus."""
    default = 20 if n_train < 1_000 else 12 if n_train < 20_000 else 8
    config.train.stage1.epochs = config.train.stage1.epochs or default
    config.train.stage2.epochs = config.train.stage2.epochs or recipe.stage2_epochs(default, depths or [], n_train)
    config.train.stage2.lr = config.train.stage2.lr or config.train.stage1.lr * config.train.lr_factor


def _build_network(config: Config, num_classes: int) -> tuple[Network, str]:
    torch.manual_seed(config.train.seed)
    backbone, source = create_backbone(config.model.backbone, num_classes, weights=config.model.weights,
                                       drop_rate=config.model.dropout)
    cfg = backbone.pretrained_cfg
    return Network(backbone, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                   tuple(cfg.get("std", (0.229, 0.224, 0.225)))), source


def _cache_images(cache: ImageCache, rows: list[dict], config: Config) -> list[str]:
    console.print(f"resize-once cache: {escape(str(cache.folder))}")
    return cache.build([row["path"] for row in rows], [row["sha1"] for row in rows], workers=config.data.workers,
                       sharded=True)


# --- the phases ---------------------------------------------------------------------------------

def _device(config: Config) -> str:
    if config.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _train_phases(network: Network, datamodule: ImageDataModule, config: Config, paths: RunPaths,
                  started: float, progress: bool = True, callbacks: tuple = (), timer=None) -> list[dict]:
    timer = timer or run_timings.Timings()
    state = _read_state(paths)
    depths = _stage2_depths(config, network, len(datamodule.labels("train")))
    if str(config.train.unfreeze).isdigit() and int(config.train.unfreeze) > network.num_stages:
        console.print(f"[yellow]warning:[/] --unfreeze {config.train.unfreeze}: {config.model.backbone} has "
                      f"{network.num_stages} stages; all of them are trained in stage 2.", highlight=False)
    phases = [Phase(None)] + [Phase(d) for d in depths]
    with timer.step("caching pass"):
        inputs = _cached_inputs(network, datamodule, config, paths, depths) if config.train.feature_cache else {}
    for phase in phases:
        if phase.name in state["done"]:
            continue
        with timer.step(phase.name):
            state, stop = _run_phase(network, phase, datamodule, inputs, config, paths, state, started, progress,
                                     callbacks)
        if stop:
            break
    network.load_state_dict(load_file(paths.phases / f"{state['best']}.safetensors"))
    return [{"phase": name, **info, "best": name == state["best"]} for name, info in state["done"].items()]


def _run_phase(network, phase: Phase, datamodule, inputs, config: Config, paths: RunPaths, state: dict,
               started: float, progress: bool, callbacks: tuple) -> tuple[dict, bool]:
    """One phase from the best weights so far: (the new run state, whether `auto` stops before it)."""
    if state["best"]:
        network.load_state_dict(load_file(paths.phases / f"{state['best']}.safetensors"))
    if distributed.from_main(_should_stop_deeper(phase, state, config, started)):  # ranks' clocks differ
        return state, True
    result = _fit_phase(network, phase, datamodule, inputs, config, paths, progress, callbacks)
    state = distributed.on_main(_save_phase, network, phase, result, state, paths)
    epochs = f"{result['epochs']} epoch{'s' * (result['epochs'] != 1)}"
    console.print(f"{phase.name}: val accuracy {result['val_acc']:.4f} ({epochs}, {result['seconds']:.0f} s)")
    return state, False


def _save_phase(network: Network, phase: Phase, result: dict, state: dict, paths: RunPaths) -> dict:
    """The phase's weights and the run state, written by rank 0; every rank continues from this state."""
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, paths.phases / f"{phase.name}.safetensors")
    state["done"][phase.name] = result
    if state["best"] is None or result["val_acc"] > state["done"][state["best"]]["val_acc"]:
        state["best"] = phase.name
    _write_state(paths, state)
    return state


def _should_stop_deeper(phase: Phase, state: dict, config: Config, started: float) -> bool:
    """Under `unfreeze auto`, go deeper while validation accuracy improves (with `auto_patience` retries).

    Far from ImageNet (grey 28-px clothes, medical scans) one block is often not enough and a deeper
    cut wins even when the first did not (see ANCHORS: last block 0.79, last three stages 0.867), so
    one non-improving depth does not end the search by default.
    """
    tried = [name for name in state["done"] if name not in ("stage1", phase.name)]  # deeper phases, in order
    if str(config.train.unfreeze) != "auto" or phase.depth is None or not tried:
        return False
    misses = 0
    best_so_far = state["done"]["stage1"]["val_acc"]
    for name in tried:
        score = state["done"][name]["val_acc"]
        misses = 0 if score > best_so_far else misses + 1
        best_so_far = max(best_so_far, score)
    if misses > config.train.auto_patience:
        console.print(f"auto unfreeze: {misses} deeper step(s) without a better validation accuracy; stopping.")
        return True
    budget = config.train.time_budget_min
    if budget is None:
        return False
    spent = time.perf_counter() - started
    predicted = recipe.predicted_seconds([state["done"][name]["seconds"] for name in tried
                                          if "seconds" in state["done"][name]]) or 0.0
    if spent + predicted > budget * 60:
        console.print(f"auto unfreeze: {phase.name} would take ~{predicted:.0f} s, past the time budget of "
                      f"{budget} min ({spent / 60:.1f} spent); stopping after {tried[-1]}.")
        return True
    return False


def _cached_inputs(network, datamodule, config, paths, depths) -> dict:
    """Frozen-prefix activations for train (augmented views) and val, for every boundary needed."""
    if paths.shared_features is not None:  # tuning: every cut any trial may want, captured once
        depths = range(1, recipe.max_depth(config.train.max_unfreeze, _device(config), network.num_stages) + 1)
    cut_depths = [d for d in depths if 0 < d < network.num_stages]
    device = _device(config)
    views = cached_views(config)
    console.print(f"caching frozen-prefix activations ({views} view{'s' * (views > 1)}) on {device}...")
    began = time.perf_counter()
    batch = max(128, config.train.batch_size)  # ONNX Runtime on a CPU gains little beyond 128; a GPU wants 256
    train = compute_activations(network, datamodule.dataset("train", augment=device == "cpu"), cut_depths,
                                paths.features / "train", views=views, device=device,
                                batch_size=batch, workers=datamodule.workers,
                                batch_augment=_batch_augment(config, device), sharded=True)
    val = compute_activations(network, datamodule.dataset("val"), cut_depths, paths.features / "val",
                              views=1, device=device, batch_size=batch, workers=datamodule.workers, sharded=True)
    network.to("cpu")
    console.print(f"cached in {time.perf_counter() - began:.0f} s")
    return {"train": train, "val": val}


def cached_views(config: Config) -> int:
    """Views of each training image the caching pass computes: unaugmented views are all alike."""
    return config.train.cache_views if config.data.augment != "none" else 1


def _batch_augment(config: Config, device: str):
    """On a GPU, augmentation runs per sample on whole batches there (CPU workers would starve it)."""
    from ..data.transforms import BatchAugment

    return BatchAugment.from_recipe(config.data.augment, config.data.image_size) if device == "cuda" else None


def _loaders(phase: Phase, datamodule: ImageDataModule, inputs: dict, config: Config):
    name = POOLED if phase.depth is None else boundary_name(phase.depth)
    if inputs and name in inputs["train"]:
        train_set = ActivationDataset(inputs["train"][name], datamodule.labels("train"))
        val_set = ActivationDataset(inputs["val"][name], datamodule.labels("val"))
        batch = config.train.batch_size
        loaders = (DataLoader(train_set, batch_size=batch, shuffle=True, collate_fn=collate_batched),
                   DataLoader(val_set, batch_size=batch * 2, shuffle=False, collate_fn=collate_batched))
        return loaders, ("features" if phase.depth is None else "prefix"), [SetEpoch(train_set)]
    train_loader = datamodule.train_dataloader()
    extra = [SetEpoch(train_loader)] if isinstance(train_loader, ImageBatches) else []  # DataLoaders: Lightning
    return (train_loader, datamodule.val_dataloader()), "images", extra


def _fit_phase(network, phase: Phase, datamodule, inputs, config: Config, paths: RunPaths,
               progress: bool = True, callbacks: tuple = ()) -> dict:
    began = time.perf_counter()
    # Shuffling, dropout and augmentation depend on the seed alone, not on what ran before in this
    # process (a freshly computed or a reused feature cache, earlier tuning trials).
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    (train_loader, val_loader), kind, extra_callbacks = _loaders(phase, datamodule, inputs, config)
    stage: StageConfig = config.train.stage1 if phase.stage == 1 else config.train.stage2
    weights = class_weights(datamodule.labels("train"), len(datamodule.classes)) \
        if config.data.balance == "weights" else None
    plan = _plan(config)
    optimization = Optimization(lr=stage.lr, weight_decay=stage.weight_decay, epochs=stage.epochs,
                                steps_per_epoch=_steps_per_epoch(train_loader, plan.world),
                                warmup_epochs=stage.warmup_epochs,
                                label_smoothing=config.train.label_smoothing)
    device = _device(config)
    train_bn = recipe.train_bn(config.train.train_bn, phase.depth, len(datamodule.labels("train")))
    module = PhaseModule(network, phase, kind, optimization, train_bn=train_bn, class_weights=weights,
                         batch_augment=_batch_augment(config, device), pad_batches=device == "cuda")
    checkpoint_dir = paths.checkpoints / phase.name
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_acc", mode="max",
                                 save_top_k=1, save_last=True)
    callbacks = [checkpoint, EarlyStopping("val_acc", mode="max", patience=stage.patience),
                 HistoryWriter(paths.history, phase.name, phase.stage), *extra_callbacks, *callbacks]
    if progress:
        callbacks.append(RichProgressBar(console_kwargs={"stderr": True}))  # stdout stays clean for --json
    trainer = L.Trainer(max_epochs=stage.epochs, accelerator=config.train.accelerator,
                        devices=plan.devices, num_nodes=plan.num_nodes, strategy=plan.strategy,
                        precision=_precision(config),
                        callbacks=callbacks, logger=make_loggers(config.train.logger, paths.root, phase.name),
                        num_sanity_val_steps=0, enable_model_summary=False,
                        log_every_n_steps=max(1, min(10, optimization.steps_per_epoch)),
                        enable_progress_bar=progress,
                        default_root_dir=paths.root)
    last = checkpoint_dir / "last.ckpt"
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last.is_file() else None)
    except SystemExit as exit_:
        # Lightning answers Ctrl-C with sys.exit(1), SIGINT left ignored: a KeyboardInterrupt again
        # (SIGTERM, e.g. a preempted SLURM job, is its SIGTERMException: that stays what it is)
        if isinstance(exit_, SIGTERMException) or exit_.code != 1 or not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, on_ctrl_c)
        raise KeyboardInterrupt from None
    finally:
        network.to(memory_format=torch.contiguous_format)  # what export, bundles and predict expect
    best = torch.load(checkpoint.best_model_path or last, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    network.to("cpu")
    return {"val_acc": float(checkpoint.best_model_score or 0.0), "epochs": trainer.current_epoch,
            "seconds": round(time.perf_counter() - began, 1), "inputs": kind, "train_bn": train_bn,
            "trainable_params": sum(p.numel() for p in network.parameters() if p.requires_grad)}


def _precision(config: Config) -> str:
    if config.train.precision != "auto":
        return config.train.precision
    return "bf16-mixed" if _device(config) == "cuda" else "32-true"


def _plan(config: Config) -> distributed.Plan:
    t = config.train
    return distributed.plan(t.devices, t.num_nodes, t.strategy, cuda=_device(config) == "cuda")


def _saved_config(resume) -> Config:
    """The config a run to resume was started with (its processes are planned from it)."""
    path = RunPaths(resume).config
    return load_config(path) if path.is_file() else Config()  # no run there: _open_run says so


def _steps_per_epoch(loader: DataLoader, world: int) -> int:
    """Optimizer steps per epoch on each rank: Lightning's DistributedSampler gives each 1/world of the data."""
    if world == 1 or not isinstance(loader, DataLoader):  # ImageBatches: its length is this rank's share
        return len(loader)
    return math.ceil(math.ceil(len(loader.sampler) / world) / loader.batch_size)


def _write_shares(paths: RunPaths) -> None:
    """distributed.json: how many items each rank computed in each sharded step (lists in rank order)."""
    if distributed.world_size() == 1:
        return
    shares = distributed.each_rank(distributed.take_shares)
    steps = sorted({step for share in shares for step in share})
    if distributed.is_main():
        table = {"world_size": len(shares), "launcher": distributed.launcher(),
                 "shares": {step: [share.get(step, 0) for share in shares] for step in steps}}
        (paths.root / "distributed.json").write_text(json.dumps(table, indent=2))


def _read_state(paths: RunPaths) -> dict:
    if paths.state.is_file():
        return json.loads(paths.state.read_text())
    paths.phases.mkdir(parents=True, exist_ok=True)
    return {"done": {}, "best": None}


def _write_state(paths: RunPaths, state: dict) -> None:
    temporary = paths.root / f".state.{uuid.uuid4().hex[:8]}.tmp"
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(paths.state)


# --- test split and bundle ----------------------------------------------------------------------

def _pass_over_every_image(predictor, datamodule: ImageDataModule, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of every manifest row (`Predictor.run_pass`: on a CPU in ONNX Runtime when it
    reproduces PyTorch on 32 val images, train images without a val split)."""
    cache, keys = datamodule.cache, datamodule.keys
    sample = cache.stack((datamodule.parts["val"][0] or keys)[:32])
    return predictor.run_pass((cache.stack(keys[i:i + chunk]) for i in range(0, len(keys), chunk)), len(keys), sample)


def _evaluate_and_bundle(network, datamodule, config, paths, classes, weight_source, phase_log, started,
                         unknown_dir=None, train_seconds: float | None = None, timer=None) -> tuple[dict, tuple]:
    """Calibrate, fit the unknown-image score, test, write the bundle; return (metrics, (logits, features)).

    The network sees every manifest row once, in manifest order: calibration (val), the unknown-image
    statistics (a train sample), the test metrics and the report after training all read that pass.
    """
    from ..predict import Predictor

    meta = {
        "classes": classes, "backbone": config.model.backbone, "weight_source": weight_source,
        "preprocessing": {"size": config.data.image_size, "mean": network.mean.flatten().tolist(),
                          "std": network.std.flatten().tolist(), "interpolation": "bicubic",
                          "resize": "shorter side to size, then center crop size x size",
                          "input": "float32 RGB in [0, 1], NCHW (normalization is inside the model)"},
        "config": config.to_dict(), "manifest_sha1": manifest_hash(paths.manifest),
        "split_counts": split_counts(read_manifest(paths.manifest)), "phases": phase_log,
        "embedding": _embedding(network, phase_log),
    }
    staging = paths.root / "model.staging"
    bundles.save_bundle(staging, network.state_dict(), meta, extra_files={"history.csv": paths.history})
    timer = timer or run_timings.Timings()
    with timer.step("pass after the phases"):
        predictor = Predictor(staging, device=_device(config))
        logits, features = _pass_over_every_image(predictor, datamodule)
    with timer.step("calibration, unknown images, test, bundle"):
        return _calibrate_test_and_bundle(predictor, logits, features, datamodule, config, paths, classes, staging,
                                          started, unknown_dir, train_seconds)


def _calibrate_test_and_bundle(predictor, logits, features, datamodule, config, paths, classes, staging, started,
                               unknown_dir, train_seconds) -> tuple[dict, tuple]:
    from ..evaluate.calibration import fit_temperature, reliability
    from ..evaluate.metrics import classification_metrics
    from ..predict import softmax

    by_split = {name: (logits[at], features[at]) for name, at in datamodule.positions.items() if name != "train"}
    val_logits, val_features = by_split["val"]
    val_labels = datamodule.labels("val")
    temperature = fit_temperature(val_logits, val_labels)
    calibration = {"temperature": temperature,
                   "val_ece_before": reliability(softmax(val_logits), val_labels)["ece"] if len(val_labels) else None,
                   "val_ece_after": reliability(softmax(val_logits, temperature), val_labels)["ece"]
                   if len(val_labels) else None}
    _fit_unknown(predictor, datamodule, config, staging, temperature, features, by_split["val"], unknown_dir)
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
    tested = f"test accuracy {metrics['accuracy']:.4f}[/] on {len(keys)} held-out images" if len(keys) \
        else "no test images: not tested[/]"
    console.print(f"[bold green]{tested}; bundle: {escape(str(paths.model))}")
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


def _fit_unknown(predictor, datamodule, config, staging, temperature, features, val, unknown_dir) -> None:
    """Unknown-image statistics from a class-stratified train sample; the threshold from the val split.

    `features`: every manifest row's (the pass after the phases); `val`: the val split's (logits, features).
    """
    from .. import ood

    labels = datamodule.labels("train")
    if not len(val[0]) or not len(labels):
        console.print("[yellow]no validation images: the bundle gets no unknown-image threshold[/]")
        return
    chosen = ood.stratified_sample(labels, ood.BANK_SIZE, config.data.seed)
    examples = ood.embed(predictor, [unknown_dir])[1:3] if unknown_dir else None
    sample = features[datamodule.positions["train"][chosen]]  # copies the sample only, not every train row
    section = ood.fit_and_attach(staging, temperature, (sample, labels[chosen]),
                                 (*val, datamodule.labels("val")), config.unknown.target_tpr, config.unknown.score,
                                 examples, seed=config.data.seed, pooled_dim=predictor.pooled_dim)
    console.print(f"unknown images: score '{section['score']}' ({section['selected_by']}), threshold "
                  f"{section['threshold']:.4f} keeps {section['val_tpr']:.1%} of validation images")


def _unknown_on_test(staging, logits, features, labels) -> dict:
    """Share of test images the unknown threshold accepts, and the accuracy on those."""
    from .. import ood

    detector = ood.load_detector(staging, bundles.read_meta(staging))
    if detector is None:
        return {}
    scores = detector.score(logits, features)
    return {f"test_{k}": v for k, v in ood.acceptance(scores, detector.section["threshold"],
                                                       logits.argmax(1) == labels).items()}
