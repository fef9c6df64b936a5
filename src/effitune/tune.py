"""`effitune tune`: an Optuna search over the training recipe, cheap because trials share the work.

All trials of a study use one split (the study folder's manifest.csv), the resize-once image cache
and one frozen-prefix activation cache per (resolution, augmentation, cached views), so a head-only trial costs
seconds. Trials are scored on the validation split only: the test split is never looked at here.
Weak trials are pruned (Optuna's median pruner, fed the best validation accuracy after every epoch).
The study lives in SQLite (study.db in the study folder) and an interrupted `tune` continues where it
stopped. The best configuration is written as a preset (best.yaml: only what differs from the
defaults) that `effitune train --config` takes. Trial 0 is the default recipe, so the study shows
what tuning gained.
"""
from __future__ import annotations

import copy
import functools
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from .config import Config, ConfigError, as_config, config_from_dict, load_config, save_config, validate
from .errors import Notify, UserError, notifier

# name -> (kind, choices or (low, high)). "size" choices are filled from the data (see size_choices).
SEARCH_SPACE: dict[str, tuple] = {
    "train.stage1.lr": ("log", (3e-4, 1e-2)),  # head learning rate
    "train.lr_factor": ("log", (0.03, 0.5)),  # stage-2 lr = stage-1 lr x this
    "train.unfreeze": ("choice", ("auto", "0", "1", "2", "3")),
    "data.image_size": ("size", ()),
    "data.augment": ("choice", ("none", "light", "standard", "strong")),
    "train.cache_views": ("choice", (2, 4, 8)),  # augmented views cached per image (cycled over epochs)
    "train.label_smoothing": ("float", (0.0, 0.2)),
    "model.dropout": ("float", (0.0, 0.5)),
    # BatchNorm of the trainable tail: as the recipe sizes it (None: frozen unless every layer trains on
    # >= 10k images), frozen, or adapting to the new data (far from ImageNet)
    "train.train_bn": ("choice", (None, False, True)),
}
STUDY_NAME = "effitune"


@dataclass
class TuneResult:
    folder: Path
    preset: Path  # best.yaml
    best_value: float  # validation accuracy of the best trial (mean over its seeds when confirmed)
    best_params: dict[str, Any]
    default_value: float | None  # the same for trial 0 (the defaults), when it finished
    trials: list[dict] = field(default_factory=list)


def tune(data: str | Path | None = None, *, out: str | Path = "runs/tune", trials: int = 20,
         budget_min: float | None = None, config: Config | dict | str | None = None,
         manifest: str | Path | None = None,
         params: list[str] | None = None, epochs: int | None = None, seed: int = 0,
         cache_root: str | Path | None = None, confirm_top: int = 3, confirm_seeds: int = 2,
         notify: Notify | None = None) -> TuneResult:
    """Run (or continue) a study of `trials` trials in `out`; return the best and write best.yaml.

    `params`: which SEARCH_SPACE entries to tune (default: all). `epochs`: epochs per phase for
    trials (default: the usual size-based number; early stopping still applies); the preset keeps
    them, so `train --config best.yaml` runs the schedule that was measured (learning rates tuned for
    6 epochs are not the best for 12). `budget_min`: no new trial starts after that many minutes and
    a running one stops at its next batch.

    One trial is one training seed, and on a few hundred validation images the seed alone moves
    accuracy by a point or two: the best single trial is often a lucky draw. So the `confirm_top`
    best trials and the defaults are trained again with `confirm_seeds` more seeds (time allowing)
    and the preset is the best *mean*; when no trial beats the defaults on that mean, best.yaml says
    so and holds the defaults. `notify` hears one line per trial (default: the `effitune` logger).
    """
    import optuna

    _check_counts(trials, budget_min, confirm_top, confirm_seeds)
    say = notifier(notify)
    config = None if config is None else as_config(config)
    folder = Path(out)
    started = time.perf_counter()
    if config is not None and (str(config.train.devices) not in ("auto", "1") or (config.train.num_nodes or 1) > 1):
        raise UserError("tune runs its trials one after another in this process: leave train.devices at auto or 1 "
                        "and train.num_nodes unset (train the best preset on several devices afterwards).")
    base = _open_study_folder(folder, data, config, manifest, cache_root)
    size, native = chosen_size(base, folder / "manifest.csv")
    space = _space(params, size, native)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from _print_trial
    study = _load_study(folder, seed)
    if not study.trials:
        study.enqueue_trial(default_params(space, size), user_attrs={"defaults": True})
    epochs = _study_epochs(study, epochs, folder)
    finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    remaining = max(0, trials - len(finished))
    deadline = None if budget_min is None else started + 60 * budget_min
    objective = _Objective(folder, base, space, epochs, deadline, cache_root, size)
    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=_seconds_left(deadline), catch=(UserError,),
                       callbacks=[functools.partial(_print_trial, say=say)])
    confirm_leaders(study, objective, confirm_top, confirm_seeds, say)
    return _summarize(study, folder, base, epochs)


def _check_counts(trials: int, budget_min: float | None, confirm_top: int, confirm_seeds: int) -> None:
    if trials < 1:
        raise UserError(f"trials (--trials) must be at least 1 (got {trials}).")
    if budget_min is not None and budget_min <= 0:
        raise UserError(f"The budget (--budget) is in minutes and must be above 0 (got {budget_min}); leave it out "
                        "for no limit.")
    if confirm_top < 0 or confirm_seeds < 0:
        raise UserError(f"confirm_top and confirm_seeds (--confirm-top, --confirm-seeds) must be 0 or more (got "
                        f"{confirm_top}, {confirm_seeds}).")


# --- the study folder --------------------------------------------------------------------------

def _open_study_folder(folder: Path, data, config: Config | None, manifest, cache_root=None) -> Config:
    """base.yaml + manifest.csv are made once; a resumed study must not change them."""
    from .pipeline import scan_and_split  # the same scan -> duplicate-aware split as `train`
    from .training.run import RunPaths
    from .data.manifest import read_manifest, write_manifest

    base_path, manifest_path = folder / "base.yaml", folder / "manifest.csv"
    if base_path.is_file() and manifest_path.is_file():
        _refuse_other_data(folder, data, manifest)
        stored = load_config(base_path)
        if config is not None and config.to_dict() != stored.to_dict():
            raise UserError(f"{folder} holds a study started with another base config ({base_path}). Continue it "
                            "without --config, or pass a new --out folder.")
        return stored
    config = copy.deepcopy(config) if config is not None else Config()
    folder.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(manifest) if manifest else scan_and_split(data, RunPaths(folder), config,
                                                                   cache_root=cache_root)
    write_manifest(rows, manifest_path)
    save_config(config, base_path)
    return config


def _refuse_other_data(folder: Path, data, manifest) -> None:
    """A continued study keeps its split: DATA or --manifest naming other images would be ignored."""
    from .data.manifest import read_manifest

    stored = folder / "manifest.csv"
    if manifest is not None and Path(manifest).resolve() != stored.resolve():
        same = _split_of(read_manifest(manifest)) == _split_of(read_manifest(stored))  # any row order or line ends
    elif data is not None and Path(data).is_dir():
        root = Path(data).resolve()
        same = all(Path(row["path"]).resolve().is_relative_to(root) for row in read_manifest(stored)[:50])
    else:
        return
    if not same:
        raise UserError(f"{folder} holds a study of other images (its split: {stored}). Continue it with the "
                        "same DATA (or none), or pass a new --out folder for this data.")


def _split_of(rows: list[dict]) -> list[tuple[str, str, str]]:
    return sorted((row["path"], row["label"], row["split"]) for row in rows)


def _load_study(folder: Path, seed: int):
    import optuna

    with warnings.catch_warnings():  # heartbeats are marked experimental; they are what makes kill -9 safe
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{(folder / 'study.db').resolve()}", heartbeat_interval=10, grace_period=30,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2))
    # a continued study draws on from where it is: the same seed again would repeat its first trials' values
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=8)
    return study


def _study_epochs(study, epochs: int | None, folder: Path) -> int | None:
    """Trials of one study share one schedule: the first call's `epochs`, kept in the study."""
    if "trial_epochs" not in study.user_attrs:
        study.set_user_attr("trial_epochs", epochs)
        return epochs
    stored = study.user_attrs["trial_epochs"]
    if epochs is not None and epochs != stored:
        raise UserError(f"The study in {folder} runs trials with --epochs {stored}; continue it with that (or "
                        "without --epochs), or start a new study with another --out folder.")
    return stored


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(1.0, deadline - time.perf_counter())


# --- the search space -----------------------------------------------------------------------------

def _space(params: list[str] | None, size: int, native: int) -> dict[str, tuple]:
    names = list(SEARCH_SPACE) if not params else [_resolve_param(name) for name in params]
    space = {name: SEARCH_SPACE[name] for name in names}
    if "data.image_size" in space:
        space["data.image_size"] = ("choice", tuple(size_choices(size, native)))
    return space


def _resolve_param(name: str) -> str:
    """Full names (train.stage1.lr) or their last part (lr_factor, augment, dropout...)."""
    if name in SEARCH_SPACE:
        return name
    matches = [full for full in SEARCH_SPACE if full.split(".")[-1] == name or full.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    raise UserError(f"'{name}' is not a tunable parameter. Choose from: {', '.join(SEARCH_SPACE)}.")


def chosen_size(base: Config, manifest_path: Path) -> tuple[int, int]:
    """(the size `train` would pick for this data, the backbone's native size)."""
    from .data.manifest import read_manifest
    from .training.run import choose_image_size, device_for, network_for

    rows = read_manifest(manifest_path)
    network, _ = network_for(base, len({row["label"] for row in rows}))
    native = int(network.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return int(base.data.image_size or choose_image_size(rows, network, device_for(base))), native


def size_choices(chosen: int, native: int) -> list[int]:
    """The chosen size and one step (32 px) either side, within [64, native]."""
    return sorted({size for size in (chosen - 32, chosen, chosen + 32) if 64 <= size <= max(native, chosen)})


def default_params(space: dict[str, tuple], size: int) -> dict[str, Any]:
    """The default recipe, expressed in the search space (trial 0)."""
    defaults = Config()
    values = {}
    for name, (kind, choices) in space.items():
        if name == "data.image_size":
            values[name] = size  # the size `train` would choose
        else:
            value = _get(defaults, name)
            values[name] = _as_choice(value, choices) if kind == "choice" else value
    return values


def _as_choice(value, choices: tuple):
    """A default as one of the choices ("auto" stays "auto"; the config's 3 matches the choice "3")."""
    if value in choices:
        return value
    match = [choice for choice in choices if str(choice) == str(value)]
    if not match:
        raise ValueError(f"default {value!r} is not among the choices {choices}")
    return match[0]


def suggest(trial, space: dict[str, tuple]) -> dict[str, Any]:
    values = {}
    for name, (kind, bounds) in space.items():
        if kind == "log":
            values[name] = trial.suggest_float(name, *bounds, log=True)
        elif kind == "float":
            values[name] = trial.suggest_float(name, *bounds)
        else:
            values[name] = trial.suggest_categorical(name, list(bounds))
    return values


def trial_config(base: Config, values: dict[str, Any], epochs: int | None = None) -> Config:
    config = config_from_dict(base.to_dict())
    for name, value in values.items():
        _set(config, name, value)
    config.train.stage2.lr = None  # follows stage1.lr x lr_factor
    config.train.devices = "1"  # trials are short and share caches: one process each, one after another
    if epochs:
        config.train.stage1.epochs = config.train.stage2.epochs = epochs
    validate(config)
    return config


def _get(config: Config, dotted: str):
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set(config: Config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    target: Any = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


# --- one trial -------------------------------------------------------------------------------------

def run_config(folder: Path, config: Config, name: str, cache_root=None, callbacks: tuple = ()):
    """Train one configuration on the study's split and shared caches (validation only): trials/NAME."""
    from .pipeline import train
    from .training.run import cached_views

    run_dir = folder / "trials" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a retried trial starts clean
    features = folder / "features" / (f"{config.model.backbone}-{config.data.image_size}px-"
                                      f"{config.data.augment}-{cached_views(config)}views")
    try:
        return train(out=run_dir, config=config, manifest=folder / "manifest.csv", progress=False,
                     cache_root=cache_root, features_dir=features, callbacks=callbacks, finish=False)
    finally:
        _drop_weights(run_dir)


class _Objective:
    def __init__(self, folder: Path, base: Config, space: dict, epochs: int | None, deadline: float | None,
                 cache_root, size: int):
        self.folder, self.base, self.space, self.epochs = folder, base, space, epochs
        self.deadline, self.cache_root, self.size = deadline, cache_root, size

    def __call__(self, trial) -> float:
        values = suggest(trial, self.space)
        config = trial_config(self.base, {"data.image_size": self.size, **values}, self.epochs)
        if self.deadline is not None:
            config.train.time_budget_min = max(0.0, (self.deadline - time.perf_counter()) / 60)
        reporter = ReportToTrial(trial, self.deadline)
        result = run_config(self.folder, config, f"{trial.number:04d}", self.cache_root, (reporter,))
        trial.set_user_attr("phases", [{k: p[k] for k in ("phase", "val_acc", "epochs", "seconds")}
                                       for p in result.phases])
        trial.set_user_attr("seconds", result.metrics["wall_seconds"])
        return result.metrics["val_acc"]


class ReportToTrial(L.Callback):
    """After every stage-2 epoch: report the trial's best accuracy so far and prune weak trials; obey the budget.

    Stage 1 (the head on cached pooled features) costs seconds and says little about where stage 2
    ends, so pruning waits for stage 2: steps count stage-2 epochs, values include stage 1's best.
    """

    def __init__(self, trial, deadline: float | None = None):
        self.trial, self.deadline = trial, deadline
        self.step, self.best = 0, 0.0

    def on_validation_end(self, trainer, pl_module):
        import optuna

        if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
            return
        self.best = max(self.best, float(trainer.callback_metrics["val_acc"]))
        if getattr(getattr(pl_module, "phase", None), "stage", 2) != 2:
            return
        self.trial.report(self.best, self.step)
        self.step += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {self.best:.4f} after {self.step} stage-2 epochs is "
                                     "below the median of earlier trials")

    def on_train_batch_end(self, trainer, *args):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            trainer.should_stop = True  # the budget is spent: finish this epoch's validation and stop


def _drop_weights(run_dir: Path) -> None:
    """Trials keep their config, history and state; phase weights and checkpoints go (the preset is the result)."""
    for name in ("phases", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _print_trial(study, trial, say: Notify) -> None:
    value = f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else trial.state.name.lower()
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        value = f"pruned at {max(trial.intermediate_values.values()):.4f}"
    best = f"{study.best_value:.4f}" if any(t.value is not None for t in study.trials) else "-"
    shown = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in trial.params.items())
    say(f"trial {trial.number}: {value} (best {best})  {shown}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- confirming the leaders ---------------------------------------------------------------------------

def confirm_leaders(study, objective: "_Objective", top: int, seeds: int, say: Notify | None = None) -> None:
    """Re-train the defaults and the `top` best trials with `seeds` more training seeds (kept in the study)."""
    import optuna

    say = notifier(say)
    if top < 1 or seeds < 1:
        return
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    leaders = [t for t in done if t.user_attrs.get("defaults")]  # first: every leader is compared with it
    leaders += sorted((t for t in done if not t.user_attrs.get("defaults")), key=lambda t: -t.value)[:top]
    scores = dict(study.user_attrs.get("confirmation", {}))
    for trial in leaders:
        for extra in range(1, seeds + 1):
            key = f"{trial.number}/{extra}"
            if key in scores:
                continue
            if objective.deadline is not None and time.perf_counter() > objective.deadline:
                say("budget spent: the remaining leaders are judged on fewer seeds")
                return
            config = trial_config(objective.base, {"data.image_size": objective.size, **trial.params},
                                  objective.epochs)
            config.train.seed = objective.base.train.seed + extra
            result = run_config(objective.folder, config, f"{trial.number:04d}-seed{config.train.seed}",
                                objective.cache_root)
            scores[key] = result.metrics["val_acc"]
            study.set_user_attr("confirmation", scores)  # saved at once: an interruption keeps it
        values = confirmed_values(trial, scores)
        say(f"trial {trial.number}: mean validation accuracy {sum(values) / len(values):.4f} over "
            f"{len(values)} seeds")


def confirmed_values(trial, scores: dict) -> list[float]:
    """The trial's own value and those of its re-runs with other seeds."""
    return [trial.value] + [v for k, v in scores.items() if k.split("/")[0] == str(trial.number)]


# --- the result ------------------------------------------------------------------------------------

def _summarize(study, folder: Path, base: Config, epochs: int | None) -> TuneResult:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise UserError(f"No trial of the study in {folder} finished: see the messages above; raise --budget "
                        "or lower --trials/--epochs.")
    scores = study.user_attrs.get("confirmation", {})
    mean = {t.number: _mean(confirmed_values(t, scores)) for t in done}
    seeds = {t.number: len(confirmed_values(t, scores)) for t in done}
    most = max(seeds.values())  # compare like with like: only trials confirmed on the most seeds
    best = max((t for t in done if seeds[t.number] == most), key=lambda t: mean[t.number])
    defaults = next((t for t in done if t.user_attrs.get("defaults")), None)
    chosen = trial_config(base, best.params, epochs)
    chosen.train.devices = base.train.devices  # trials ran in one process; the preset need not
    schedule = f" with {epochs} epochs per phase" if epochs else ""
    over = f"mean over {most} seeds " if most > 1 else ""
    verdict = ("no trial beat the defaults: this preset is the default recipe" if defaults is not None
               and best.number == defaults.number else f"trial {best.number}")
    header = (f"effitune tune: {verdict}; best of {len(done)} finished trials{schedule}, validation accuracy "
              f"{over}{mean[best.number]:.4f}" + (f" (defaults: {mean[defaults.number]:.4f})" if defaults else ""))
    preset = write_preset(chosen, folder / "best.yaml", header=header)
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "defaults": bool(t.user_attrs.get("defaults")), "seconds": t.user_attrs.get("seconds"),
             "mean_value": mean.get(t.number), "seeds": seeds.get(t.number)} for t in study.trials]
    return TuneResult(folder, preset, mean[best.number], best.params,
                      mean[defaults.number] if defaults else None, rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def preset_values(config: Config) -> dict:
    """What differs from the defaults, nested by section (stage-2 lr left to follow lr_factor)."""
    return _difference(config.to_dict(), Config().to_dict())


def _difference(values: dict, defaults: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _difference(value, defaults.get(key, {}))
            if nested:
                out[key] = nested
        elif value != defaults.get(key):
            out[key] = value
    return out


def write_preset(config: Config, path: Path, header: str = "") -> Path:
    """A YAML preset holding only the differences from the defaults, for `effitune train --config`."""
    values = preset_values(config)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(values, sort_keys=False)
    Path(path).write_text(text)
    try:
        load_config(path)  # what we write must load
    except ConfigError as error:  # pragma: no cover - a bug, not a user mistake
        raise RuntimeError(f"written preset {path} does not load: {error}") from error
    return Path(path)

