"""The `unfreeze auto` policy, the data-driven defaults, and runs that must train identically."""
import time

from effitune.config import Config, load_config
from effitune.training.callbacks import read_history
from effitune.pipeline import train
from effitune.training.run import _should_stop_deeper, fill_epochs
from effitune.training.stages import Phase


def state(**scores):
    done = {"stage1": {"val_acc": scores.pop("stage1")}}
    done.update({f"stage2-depth{d[1:]}": {"val_acc": v} for d, v in scores.items()})
    return {"done": done, "best": max(done, key=lambda k: done[k]["val_acc"])}


def tiny_cpu_config() -> Config:
    """One epoch per phase at 32 px, on the CPU (the pass after the phases differs on a GPU)."""
    return load_config(overrides={"data.image_size": 32, "train.unfreeze": "1", "train.stage1.epochs": 1,
                                  "train.stage2.epochs": 1, "train.accelerator": "cpu"})


def test_auto_goes_deeper_while_improving_with_one_retry():
    config, now = Config(), time.perf_counter()
    assert not _should_stop_deeper(Phase(2), state(stage1=0.80, d1=0.85), config, now)
    assert not _should_stop_deeper(Phase(2), state(stage1=0.80, d1=0.79), config, now)  # one miss: retry deeper
    assert _should_stop_deeper(Phase(3), state(stage1=0.80, d1=0.79, d2=0.80), config, now)  # two misses
    assert not _should_stop_deeper(Phase(3), state(stage1=0.80, d1=0.79, d2=0.82), config, now)
    config.train.auto_patience = 0
    assert _should_stop_deeper(Phase(2), state(stage1=0.80, d1=0.79), config, now)


def test_auto_respects_time_budget_and_fixed_depths():
    config = Config()
    config.train.time_budget_min = 1.0
    long_ago = time.perf_counter() - 120
    assert _should_stop_deeper(Phase(2), state(stage1=0.80, d1=0.85), config, long_ago)
    config.train.unfreeze = "3"
    assert not _should_stop_deeper(Phase(3), state(stage1=0.80, d1=0.70, d2=0.70), config, long_ago)


def test_epochs_and_stage2_lr_defaults():
    config = Config()
    fill_epochs(config, 500)
    assert config.train.stage1.epochs == 20 and config.train.stage2.epochs == 20
    assert config.train.stage2.lr == config.train.stage1.lr * config.train.lr_factor
    big = Config()
    big.train.stage1.epochs = 3
    fill_epochs(big, 50_000)
    assert big.train.stage1.epochs == 3 and big.train.stage2.epochs == 8


def test_a_reused_feature_cache_trains_exactly_like_one_computed_in_the_run(tiny_dataset_module, tmp_path):
    """A tuning trial (shared cache, computed earlier) and a full run (cache computed in the run) of one
    configuration and seed must train the same network: same history, digit for digit. They did not
    while the training modes depended on what ran before fit (dropout off after caching, BN moving)."""
    config = load_config(overrides={"data.image_size": 64, "train.unfreeze": "1", "train.batch_size": 16,
                                    "train.stage1.epochs": 2, "train.stage2.epochs": 2, "model.dropout": 0.5,
                                    "train.cache_views": 2})
    cache = tmp_path / "cache"
    first = train(tiny_dataset_module, out=tmp_path / "trial", config=config, cache_root=cache, progress=False,
                  features_dir=tmp_path / "shared", finish=False)
    train(out=tmp_path / "trial-again", manifest=first.run_dir / "manifest.csv", config=config, cache_root=cache,
          progress=False, features_dir=tmp_path / "shared", finish=False)  # the cache is reused now
    train(out=tmp_path / "fresh", manifest=first.run_dir / "manifest.csv", config=config, cache_root=cache,
          progress=False, finish=False)

    def learning(run: str) -> list[tuple]:
        return [tuple(v for k, v in row.items() if k != "seconds") for row in read_history(tmp_path / run / "history.csv")]
    assert len(learning("trial")) == 4
    assert learning("trial-again") == learning("trial") == learning("fresh")


def test_without_augmentation_one_view_is_cached(tiny_dataset_module, tmp_path):
    """Every view of an unaugmented image is the same: caching 4 of them would cost 4 forwards for one."""
    import numpy as np

    config = load_config(overrides={"data.image_size": 32, "data.augment": "none", "train.unfreeze": "1",
                                    "train.stage1.epochs": 1, "train.stage2.epochs": 1, "train.cache_views": 4})
    run = train(tiny_dataset_module, out=tmp_path / "run", config=config, cache_root=tmp_path / "cache",
                progress=False, finish=False)
    assert np.load(run.run_dir / "features" / "train" / "pooled.npy", mmap_mode="r").shape[0] == 1


def test_the_network_sees_each_image_once_after_training(tiny_dataset_module, tmp_path, monkeypatch):
    """Calibration, the unknown-image score, the test split and the report share one pass over the manifest
    (they made three: val, a train sample and test, then every image again for the report), on a CPU in
    ONNX Runtime after a parity check on a few val images in PyTorch."""
    from effitune import predict
    from effitune.evaluate import report
    from effitune.runtime.engines import OnnxEngine, TorchEngine

    seen = {"torch": [], "onnx": []}
    for name, engine in (("torch", TorchEngine), ("onnx", OnnxEngine)):
        monkeypatch.setattr(engine, "run", lambda self, images, run=engine.run, name=name:
                            seen[name].append(len(images)) or run(self, images))
    monkeypatch.setattr(report, "embed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("embedded again")))
    monkeypatch.setattr(predict.Predictor, "long_pass", 1)  # 60 images: a pass long enough for ONNX Runtime
    result = train(tiny_dataset_module, out=tmp_path / "run", config=tiny_cpu_config(), cache_root=tmp_path / "cache",
                   progress=False)
    assert result.report is not None  # a failing report only warns: None would mean it embedded again
    rows = len((result.run_dir / "manifest.csv").read_text().splitlines()) - 1
    parity = sum(seen["torch"])  # the images of the parity check: PyTorch's reference, then ONNX Runtime
    assert 0 < parity <= 32 and sum(seen["onnx"]) == rows + parity  # every image once, none twice


def test_without_onnx_the_pass_runs_in_pytorch_and_the_run_finishes(tiny_dataset_module, tmp_path, monkeypatch):
    """onnx/onnxruntime are the optional `effitune[export]`: a plain install must still train to a bundle."""
    import sys

    import pytest

    from effitune import predict
    from effitune.runtime.engines import TorchEngine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    monkeypatch.setattr(predict.Predictor, "long_pass", 1)  # 60 images: long enough to try ONNX Runtime
    seen = []
    monkeypatch.setattr(TorchEngine, "run", lambda self, images, run=TorchEngine.run:
                        seen.append(len(images)) or run(self, images))
    with pytest.warns(UserWarning, match=r"effitune\[export\]"):
        result = train(tiny_dataset_module, out=tmp_path / "run", config=tiny_cpu_config(),
                       cache_root=tmp_path / "cache", progress=False)
    assert (result.bundle / "effitune.json").is_file() and result.report is not None
    assert sum(seen) == len((result.run_dir / "manifest.csv").read_text().splitlines()) - 1


def test_onnx_runtime_failing_mid_pass_costs_time_not_the_run(tiny_dataset_module, tmp_path, monkeypatch):
    import pytest

    from effitune import predict
    from effitune.runtime import graph

    class Failing:
        def run(self, images):
            raise RuntimeError("ORT went away")

    monkeypatch.setattr(graph, "in_memory_engine", lambda network, images: Failing())
    monkeypatch.setattr(predict.Predictor, "long_pass", 1)
    with pytest.warns(UserWarning, match="ORT went away.*PyTorch"):
        result = train(tiny_dataset_module, out=tmp_path / "run", config=tiny_cpu_config(),
                       cache_root=tmp_path / "cache", progress=False)
    assert (result.bundle / "effitune.json").is_file() and "accuracy" in result.metrics


def split_manifest(data, folder, val: float, test: float):
    from typer.testing import CliRunner

    from effitune.cli import app

    result = CliRunner().invoke(app, ["split", str(data), "--out", str(folder), "--val", str(val), "--test", str(test)])
    assert result.exit_code == 0, result.output
    return folder / "manifest.csv"


def test_a_split_without_validation_or_with_an_untrainable_class_is_refused_up_front(tiny_dataset_module, tmp_path):
    import pytest

    from effitune.data.manifest import read_manifest, write_manifest
    from effitune.errors import UserError

    no_val = split_manifest(tiny_dataset_module, tmp_path / "noval", val=0, test=0)
    with pytest.raises(UserError, match="no validation images"):
        train(out=tmp_path / "run", manifest=no_val, config=tiny_cpu_config(), progress=False)
    assert not (tmp_path / "run").exists()
    rows = read_manifest(split_manifest(tiny_dataset_module, tmp_path / "usual", val=0.2, test=0.2))
    rows.append({**rows[0], "label": "typo", "split": "val"})
    write_manifest(rows, tmp_path / "typo.csv")
    with pytest.raises(UserError, match="'typo' have no training images"):
        train(out=tmp_path / "run", manifest=tmp_path / "typo.csv", config=tiny_cpu_config(), progress=False)


def test_without_a_test_split_the_run_says_it_was_not_tested(tiny_dataset_module, tmp_path):
    import pytest

    from effitune.errors import EffituneWarning

    manifest = split_manifest(tiny_dataset_module, tmp_path / "notest", val=0.25, test=0)
    said = []
    with pytest.warns(EffituneWarning, match="the split has no test images"):
        result = train(out=tmp_path / "run", manifest=manifest, config=tiny_cpu_config(), progress=False,
                       notify=said.append)
    assert "no test images: not tested" in " ".join(said) and "nan" not in " ".join(said)
    assert "accuracy" not in result.metrics and (result.bundle / "weights.safetensors").is_file()


def test_a_notebook_can_turn_effitunes_training_warnings_into_errors(tiny_dataset_module, tmp_path):
    """`warnings.simplefilter("error")` makes the warning an exception, before any training starts."""
    import warnings

    import pytest

    from effitune.errors import EffituneWarning

    manifest = split_manifest(tiny_dataset_module, tmp_path / "notest", val=0.25, test=0)
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EffituneWarning, match="the split has no test images"):
            train(out=tmp_path / "run", manifest=manifest, config=tiny_cpu_config(), progress=False,
                  notify=said.append)
    assert not any("val accuracy" in line for line in said)  # stopped before the first phase
    assert not (tmp_path / "run" / "model").exists()


def test_resume_takes_the_runs_own_settings_and_refuses_others(tmp_path):
    import pytest

    from effitune.errors import UserError

    for given in ({"config": {"train.stage1.epochs": 1}}, {"data": tmp_path}, {"manifest": tmp_path / "m.csv"}):
        with pytest.raises(UserError, match=f"{next(iter(given))} cannot change them"):
            train(resume=tmp_path / "run", **given)


def test_train_takes_a_dict_config_from_a_notebook(tiny_dataset_module, tmp_path):
    result = train(tiny_dataset_module, out=tmp_path / "run", progress=False, finish=False,
                   config={"data": {"image_size": 32}, "train.unfreeze": "0", "train.stage1.epochs": 1,
                           "train.accelerator": "cpu"})
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.data.image_size == 32 and saved.train.stage1.epochs == 1 and saved.train.unfreeze == "0"


def test_timings_add_up_to_the_wall_time_and_reach_the_report(tiny_dataset_module, tmp_path):
    import json

    from effitune import timings

    started = time.perf_counter()
    result = train(tiny_dataset_module, out=tmp_path / "run", config=tiny_cpu_config(), cache_root=tmp_path / "cache",
                   progress=False)
    outside = time.perf_counter() - started
    table = timings.read(result.run_dir)
    assert table == result.timings
    for step in ("scan", "split", "resize cache", "caching pass", "stage1", "stage2-depth1", "pass after the phases",
                 "calibration, unknown images, test, bundle", "report"):
        assert step in table and table[step] >= 0, step
    steps = sum(v for k, v in table.items() if k not in ("wall_seconds", "unaccounted_seconds"))
    assert table["wall_seconds"] <= outside + 0.01  # rounded to 0.01 s
    assert steps >= 0.85 * table["wall_seconds"]  # the timed steps cover the run: nothing big goes untimed
    assert abs(steps + table["unaccounted_seconds"] - table["wall_seconds"]) < 0.05
    shown = json.loads((result.run_dir / "report" / "report.json").read_text())["timings"]
    assert "report" not in shown and shown["stage1"] == table["stage1"]  # the steps up to the report
    assert "Where the time went" in (result.run_dir / "report" / "report.html").read_text()
