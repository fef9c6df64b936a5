"""`effitune tune`: presets, the search space, pruning, budget and resuming a study."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

import effitune.pipeline as run_module
from effitune.config import Config, load_config
from effitune.errors import UserError
from effitune.training.stages import Phase
from effitune.tune import (SEARCH_SPACE, ReportToTrial, _resolve_param, _space, default_params, preset_values,
                           suggest, tune, write_preset)

TINY = {"data.image_size": 64, "train.batch_size": 16, "train.unfreeze": "0"}


def tiny_base() -> Config:
    return load_config(overrides=TINY)


def test_preset_holds_only_differences_and_round_trips(tmp_path):
    config = Config()
    config.train.stage1.lr = 0.0042
    config.data.augment = "strong"
    config.model.dropout = 0.35
    path = write_preset(config, tmp_path / "best.yaml", header="best of 3")
    text = path.read_text()
    assert text.startswith("# best of 3\n")
    assert yaml.safe_load(text) == {"data": {"augment": "strong"}, "model": {"dropout": 0.35},
                                    "train": {"stage1": {"lr": 0.0042}}}
    assert load_config(path).to_dict() == config.to_dict()
    assert preset_values(Config()) == {}


def test_parameters_by_short_name_and_a_clear_error():
    assert _resolve_param("lr_factor") == "train.lr_factor"
    assert _resolve_param("lr") == "train.stage1.lr"
    assert _resolve_param("augment") == "data.augment"
    with pytest.raises(UserError, match="not a tunable parameter"):
        _resolve_param("learning_rate")


def test_weak_trials_are_pruned():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.9, 0.8):
        trial = study.ask()
        for step in range(3):
            trial.report(value, step)
        study.tell(trial, value)
    weak = study.ask()
    callback = ReportToTrial(weak)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val_acc": 0.3})
    callback.on_validation_end(trainer, SimpleNamespace(phase=Phase(None)))  # stage 1 is never judged
    assert callback.step == 0 and callback.best == 0.3
    with pytest.raises(optuna.TrialPruned):
        callback.on_validation_end(trainer, SimpleNamespace(phase=Phase(2)))
    strong = ReportToTrial(study.ask())
    strong.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={"val_acc": 0.95}),
                             SimpleNamespace(phase=Phase(1)))
    assert strong.best == 0.95 and strong.step == 1


def _states(folder: Path) -> list[str]:
    study = optuna.load_study(study_name="effitune", storage=f"sqlite:///{folder / 'study.db'}")
    return [t.state.name for t in study.trials]


def test_study_resumes_after_an_interruption_reusing_split_and_features(tiny_dataset_module, tmp_path, monkeypatch):
    out, cache = tmp_path / "study", tmp_path / "cache"
    real_train, calls = run_module.train, []

    def interrupted_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of trial 2
        return real_train(*args, **kwargs)

    monkeypatch.setattr(run_module, "train", interrupted_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_dataset_module, out=out, trials=3, config=tiny_base(), params=["lr", "dropout"], epochs=2,
             cache_root=cache)
    assert _states(out) == ["COMPLETE", "COMPLETE", "FAIL"]
    manifest = (out / "manifest.csv").read_bytes()
    [features] = (out / "features").iterdir()
    stamp = (features / "train" / "activations.json").stat().st_mtime_ns

    monkeypatch.setattr(run_module, "train", real_train)
    result = tune(tiny_dataset_module, out=out, trials=3, params=["lr", "dropout"], epochs=2, cache_root=cache)
    assert _states(out) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert (out / "manifest.csv").read_bytes() == manifest  # same split
    assert (features / "train" / "activations.json").stat().st_mtime_ns == stamp  # features not recomputed
    assert result.default_value is not None and result.trials[0]["defaults"]
    finished = [t for t in result.trials if t["state"] == "complete"]
    assert all(t["seeds"] == 3 for t in finished)  # every leader and the defaults re-trained with 2 more seeds
    assert result.best_value == max(t["mean_value"] for t in finished)
    assert result.default_value == next(t["mean_value"] for t in finished if t["defaults"])
    assert sorted(p.name for p in (out / "trials").iterdir())[:3] == ["0000", "0000-seed1", "0000-seed2"]
    preset = load_config(result.preset)
    assert preset.train.stage1.lr == pytest.approx(result.best_params["train.stage1.lr"])
    assert preset.data.image_size == 64 and preset.train.unfreeze == "0"  # the base config travels too
    assert preset.train.stage1.epochs == 2 == preset.train.stage2.epochs  # the schedule that was measured
    assert not list((out / "trials").glob("*/phases"))  # trials keep no weights

    params = [tuple(sorted(t["params"].items())) for t in result.trials]
    assert len(set(params)) == len(params)  # the continued study drew new values (not trial 1's again)
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset_module, other)
    with pytest.raises(UserError, match="holds a study of other images"):
        tune(other, out=out, trials=3, params=["lr", "dropout"], epochs=2, cache_root=cache)
    with pytest.raises(UserError, match="runs trials with --epochs 2"):
        tune(out=out, trials=3, params=["lr", "dropout"], epochs=5, cache_root=cache)
    with pytest.raises(UserError, match="another base config"):
        tune(out=out, trials=3, config=Config(), params=["lr"], cache_root=cache)


def test_budget_stops_the_study_and_the_cli_reports_json(tiny_dataset_module, tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "effitune.cli", "tune", str(tiny_dataset_module), "--out", str(out),
               "--trials", "1000", "--budget", "0.3", "--params", "lr,label_smoothing", "--epochs", "2",
               "--batch-size", "16", "--json"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"image_size": 64}, "train": {"unfreeze": "0"}}))
    result = subprocess.run([*command, "--config", str(tmp_path / "base.yaml")], capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "EFFITUNE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    finished = [t for t in report["trials"] if t["state"] in ("complete", "pruned")]
    assert 1 <= len(finished) < 1000  # head-only trials of 2 epochs take well under a second each
    assert Path(report["preset"]).is_file() and 0 <= report["best_value"] <= 1


def test_trial_zero_is_exactly_the_default_recipe():
    space = _space(None, 96, 224)
    assert set(space) == set(SEARCH_SPACE)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(default_params(space, 96))
    values = suggest(study.ask(), space)  # raises when a default is not a valid choice
    defaults = Config()
    assert values["train.stage1.lr"] == defaults.train.stage1.lr and values["data.image_size"] == 96
    assert values["train.cache_views"] == defaults.train.cache_views and values["train.unfreeze"] == "auto"
    assert values["data.augment"] == defaults.data.augment and values["model.dropout"] == defaults.model.dropout
