"""`effitune runs`: runs side by side, read from the files each run leaves."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from effitune.cli import app
from effitune.config import load_config
from effitune.errors import UserError
from effitune.runs import find_runs, list_runs
from effitune.pipeline import train


@pytest.fixture(scope="module")
def runs_folder(tiny_dataset_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = load_config(overrides={"data.image_size": 64, "train.batch_size": 16, "train.unfreeze": "1",
                                    "train.stage1.epochs": 3, "train.stage2.epochs": 2})
    result = train(tiny_dataset_module, out=root / "finished", config=config, progress=False,
                   cache_root=root / "cache")
    interrupted = root / "group" / "interrupted"  # a run stopped after stage 1, in a subfolder
    interrupted.mkdir(parents=True)
    shutil.copy(root / "finished" / "config.yaml", interrupted)
    state = json.loads((root / "finished" / "state.json").read_text())
    stage1 = state["done"]["stage1"]
    (interrupted / "state.json").write_text(json.dumps({"done": {"stage1": {**stage1, "val_acc": 0.01}},
                                                        "best": "stage1"}))
    crashed = root / "crashed"  # stopped before its first phase ended: a config and a split only
    crashed.mkdir()
    for name in ("config.yaml", "manifest.csv"):
        shutil.copy(root / "finished" / name, crashed)
    return root, result


def test_lists_finished_and_interrupted_runs_and_marks_the_best(runs_folder):
    root, result = runs_folder
    assert [p.name for p in find_runs(root)] == ["crashed", "finished", "interrupted"]  # not cache/, model/
    rows = list_runs(root)
    finished, interrupted, crashed = rows
    assert crashed["run"] == "crashed" and crashed["status"] == "incomplete" and crashed["val_acc"] is None
    assert finished["run"] == "finished" and finished["status"] == "done" and finished["best"]
    assert finished["test_acc"] == pytest.approx(result.metrics["accuracy"])
    assert finished["val_acc"] == max(p["val_acc"] for p in result.phases)
    assert finished["backbone"] == "tf_efficientnet_lite0" and finished["size"] == 64
    assert finished["bundle_mb"] > 1 and finished["epochs"] >= 2 and finished["wall_s"] > 0
    assert interrupted["run"] == "group/interrupted" and interrupted["status"] == "incomplete"
    assert not interrupted["best"] and interrupted["test_acc"] is None and interrupted["bundle_mb"] is None
    assert [r["run"] for r in list_runs(root, sort="run")] == ["crashed", "finished", "group/interrupted"]


def test_cli_table_json_and_errors(runs_folder, tmp_path):
    root, _ = runs_folder
    runner = CliRunner()
    listed = runner.invoke(app, ["runs", str(root), "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["run"] for row in json.loads(listed.stdout)] == ["finished", "group/interrupted", "crashed"]
    table = runner.invoke(app, ["runs", str(root)], env={"COLUMNS": "150"})
    assert table.exit_code == 0 and "finished" in table.output
    missing = runner.invoke(app, ["runs", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output
    with pytest.raises(UserError, match="Cannot sort by"):
        list_runs(root, sort="speed")
