"""Fitting a run's network: resize cache -> frozen-prefix cache -> stage 1 -> stage 2 (auto depth).

Readable top to bottom: `fit()` lists the steps; each step is a small function below it. The phases
write their weights and `state.json` in the run folder (`RunPaths`), so a resumed run starts after its
last finished phase, from its last checkpoint. What comes before (scan, split) and after (calibration,
test, bundle, report) is `effitune.pipeline`'s. Progress goes to `notify` (one line per step, the
`effitune` logger's INFO by default); what the user should act on is an `EffituneWarning`.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .. import distributed, files
from .. import timings as run_timings
from ..config import Config, StageConfig, save_config
from ..data.batches import ImageBatches
from ..data.cache import ImageCache, images_root
from ..data.datamodule import ActivationDataset, ImageDataModule, class_weights, collate_batched
from ..errors import EffituneWarning, Notify, UserError, notifier
from ..models.backbones import backbone_info
from ..models.network import Network, build_network
from .callbacks import HistoryWriter, SetEpoch
from .features import POOLED, boundary_name, compute_activations
from .loggers import make_loggers
from .module import Optimization, PhaseModule
from . import recipe
from .stages import Phase

def quiet_lightning() -> None:
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
class Fitted:
    """A fitted run: the network with its best phase's weights, and what made it."""
    network: Network
    datamodule: ImageDataModule
    classes: list[str]
    weight_source: str
    phases: list[dict]  # one entry per phase: val_acc, epochs, seconds, ..., best


def image_cache(config: Config, cache_root: str | Path | None = None, size: int | None = None) -> ImageCache:
    """The run's resize-once cache at `size` (default: the run's image size)."""
    return ImageCache(images_root(cache_root),
                      size or config.data.image_size, max_pixels=config.data.max_pixels)


def scan_cache_plan(config: Config) -> tuple[int | None, int]:
    """(size, from_side): the cache size training will use, as far as it is known before the scan.

    A configured size caches every image. An automatic one (`choose_image_size`) is the backbone's
    native size whenever most images are at least that large, so the scan caches those images at it
    (a photo is where decoding costs); the rest, and every image when the choice goes otherwise, are
    cached after the scan.
    """
    if config.data.image_size:
        return config.data.image_size, 0
    try:
        native = backbone_info(config.model.backbone).native_resolution
    except (UserError, RuntimeError, AttributeError):  # an unknown backbone: fit refuses it with its message
        return None, 0
    return native, native


def fit(rows: list[dict], config: Config, paths: RunPaths, *, cache_root: str | Path | None = None,
        progress: bool = True, callbacks: tuple = (), started: float | None = None,
        timer: run_timings.Timings | None = None, notify: Notify | None = None) -> Fitted:
    """Train the network on the manifest `rows` (a `split` each) in the run folder `paths`.

    `config`'s sized defaults (image size, epochs, batch size) are filled in here and saved as the
    run's config.yaml. `started`: when the run began (the time budget counts from it).
    """
    say, timer = notifier(notify), timer or run_timings.Timings()
    started = time.perf_counter() if started is None else started
    classes = sorted({row["label"] for row in rows})
    with timer.step("build network"):
        network, weight_source = network_for(config, len(classes))
    device = device_for(config)
    config.data.image_size = config.data.image_size or choose_image_size(rows, network, device)
    n_train = sum(row["split"] == "train" for row in rows)
    fill_epochs(config, n_train, _stage2_depths(config, network, n_train))
    config.train.batch_size = config.train.batch_size or (256 if device == "cuda" else 64)
    distributed.on_main(save_config, config, paths.config)
    cache = image_cache(config, cache_root)
    say(f"effitune {len(rows)} images, {len(classes)} classes, {config.model.backbone} @ {config.data.image_size}px, "
        f"weights: {weight_source}")
    with timer.step("resize cache"):
        keys = _cache_images(cache, rows, config, say)
    datamodule = ImageDataModule(rows, keys, classes, cache, batch_size=config.train.batch_size,
                                 augment=config.data.augment, balance=config.data.balance,
                                 workers=config.data.workers, seed=config.data.seed,
                                 device_augment=device == "cuda")
    phases = _train_phases(network, datamodule, config, paths, started, progress, callbacks, timer, say)
    _write_shares(paths)
    return Fitted(network, datamodule, classes, weight_source, phases)


def choose_image_size(rows: list[dict], network: Network, device: str = "cpu") -> int:
    """The backbone's native size for photos; for small images a few times their size (`recipe`)."""
    native = int(network.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    short_side = statistics.median(min(row["width"], row["height"]) for row in rows)
    if short_side >= native:
        return native
    return recipe.small_image_size(short_side, native, device)


def _stage2_depths(config: Config, network: Network, n_train: int) -> list[int]:
    return recipe.auto_depths(config.train.unfreeze, config.train.max_unfreeze, network.num_stages, device_for(config),
                              n_train)


def fill_epochs(config: Config, n_train: int, depths: list[int] | None = None) -> None:
    """Small data sets need more passes; early stopping ends a phase sooner when it plateaus."""
    default = 20 if n_train < 1_000 else 12 if n_train < 20_000 else 8
    config.train.stage1.epochs = config.train.stage1.epochs or default
    config.train.stage2.epochs = config.train.stage2.epochs or recipe.stage2_epochs(default, depths or [], n_train)
    config.train.stage2.lr = config.train.stage2.lr or config.train.stage1.lr * config.train.lr_factor


def network_for(config: Config, num_classes: int) -> tuple[Network, str]:
    """(the run's network with pretrained weights, where they came from), seeded by `train.seed`."""
    torch.manual_seed(config.train.seed)
    return build_network(config.model.backbone, num_classes, weights=config.model.weights,
                         drop_rate=config.model.dropout)


def _cache_images(cache: ImageCache, rows: list[dict], config: Config, say: Notify) -> list[str]:
    say(f"resize-once cache: {cache.folder}")
    return cache.build([row["path"] for row in rows], [row["sha1"] for row in rows], workers=config.data.workers,
                       sharded=True)


# --- the phases ---------------------------------------------------------------------------------

def device_for(config: Config) -> str:
    if config.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _train_phases(network: Network, datamodule: ImageDataModule, config: Config, paths: RunPaths,
                  started: float, progress: bool = True, callbacks: tuple = (), timer=None,
                  say: Notify | None = None) -> list[dict]:
    timer, say = timer or run_timings.Timings(), notifier(say)
    state = _read_state(paths)
    depths = _stage2_depths(config, network, len(datamodule.labels("train")))
    if str(config.train.unfreeze).isdigit() and int(config.train.unfreeze) > network.num_stages:
        warnings.warn(f"--unfreeze {config.train.unfreeze}: {config.model.backbone} has {network.num_stages} stages; "
                      "all of them are trained in stage 2.", EffituneWarning, stacklevel=2)
    phases = [Phase(None)] + [Phase(d) for d in depths]
    with timer.step("caching pass"):
        inputs = _cached_inputs(network, datamodule, config, paths, depths, say) if config.train.feature_cache else {}
    for phase in phases:
        if phase.name in state["done"]:
            continue
        with timer.step(phase.name):
            state, stop = _run_phase(network, phase, datamodule, inputs, config, paths, state, started, progress,
                                     callbacks, say)
        if stop:
            break
    network.load_state_dict(load_file(paths.phases / f"{state['best']}.safetensors"))
    return [{"phase": name, **info, "best": name == state["best"]} for name, info in state["done"].items()]


def _run_phase(network, phase: Phase, datamodule, inputs, config: Config, paths: RunPaths, state: dict,
               started: float, progress: bool, callbacks: tuple, say: Notify) -> tuple[dict, bool]:
    """One phase from the best weights so far: (the new run state, whether `auto` stops before it)."""
    if state["best"]:
        network.load_state_dict(load_file(paths.phases / f"{state['best']}.safetensors"))
    if distributed.from_main(_should_stop_deeper(phase, state, config, started, say)):  # ranks' clocks differ
        return state, True
    result = _fit_phase(network, phase, datamodule, inputs, config, paths, progress, callbacks)
    state = distributed.on_main(_save_phase, network, phase, result, state, paths)
    epochs = f"{result['epochs']} epoch{'s' * (result['epochs'] != 1)}"
    say(f"{phase.name}: val accuracy {result['val_acc']:.4f} ({epochs}, {result['seconds']:.0f} s)")
    return state, False


def _save_phase(network: Network, phase: Phase, result: dict, state: dict, paths: RunPaths) -> dict:
    """The phase's weights and the run state, written by rank 0; every rank continues from this state."""
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, paths.phases / f"{phase.name}.safetensors")
    state["done"][phase.name] = result
    if state["best"] is None or result["val_acc"] > state["done"][state["best"]]["val_acc"]:
        state["best"] = phase.name
    _write_state(paths, state)
    return state


def _should_stop_deeper(phase: Phase, state: dict, config: Config, started: float, say: Notify | None = None) -> bool:
    """Under `unfreeze auto`, go deeper while validation accuracy improves (with `auto_patience` retries).

    Far from ImageNet (grey 28-px clothes, medical scans) one block is often not enough and a deeper
    cut wins even when the first did not (see ANCHORS: last block 0.79, last three stages 0.867), so
    one non-improving depth does not end the search by default.
    """
    say = notifier(say)
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
        say(f"auto unfreeze: {misses} deeper step(s) without a better validation accuracy; stopping.")
        return True
    budget = config.train.time_budget_min
    if budget is None:
        return False
    spent = time.perf_counter() - started
    predicted = recipe.predicted_seconds([state["done"][name]["seconds"] for name in tried
                                          if "seconds" in state["done"][name]]) or 0.0
    if spent + predicted > budget * 60:
        say(f"auto unfreeze: {phase.name} would take ~{predicted:.0f} s, past the time budget of "
            f"{budget} min ({spent / 60:.1f} spent); stopping after {tried[-1]}.")
        return True
    return False


def _cached_inputs(network, datamodule, config, paths, depths, say: Notify | None = None) -> dict:
    """Frozen-prefix activations for train (augmented views) and val, for every boundary needed."""
    if paths.shared_features is not None:  # tuning: every cut any trial may want, captured once
        depths = range(1, recipe.max_depth(config.train.max_unfreeze, device_for(config), network.num_stages) + 1)
    cut_depths = [d for d in depths if 0 < d < network.num_stages]
    device = device_for(config)
    views = cached_views(config)
    say = notifier(say)
    say(f"caching frozen-prefix activations ({views} view{'s' * (views > 1)}) on {device}...")
    began = time.perf_counter()
    batch = max(128, config.train.batch_size)  # ONNX Runtime on a CPU gains little beyond 128; a GPU wants 256
    train = compute_activations(network, datamodule.dataset("train", augment=device == "cpu"), cut_depths,
                                paths.features / "train", views=views, device=device,
                                batch_size=batch, workers=datamodule.workers,
                                batch_augment=_batch_augment(config, device), sharded=True)
    val = compute_activations(network, datamodule.dataset("val"), cut_depths, paths.features / "val",
                              views=1, device=device, batch_size=batch, workers=datamodule.workers, sharded=True)
    network.to("cpu")
    say(f"cached in {time.perf_counter() - began:.0f} s")
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
    plan = plan_for(config)
    optimization = Optimization(lr=stage.lr, weight_decay=stage.weight_decay, epochs=stage.epochs,
                                steps_per_epoch=_steps_per_epoch(train_loader, plan.world),
                                warmup_epochs=stage.warmup_epochs,
                                label_smoothing=config.train.label_smoothing)
    device = device_for(config)
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
    return "bf16-mixed" if device_for(config) == "cuda" else "32-true"


def plan_for(config: Config) -> distributed.Plan:
    t = config.train
    return distributed.plan(t.devices, t.num_nodes, t.strategy, cuda=device_for(config) == "cuda")


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
    files.write_text(paths.state, json.dumps(state, indent=2))


