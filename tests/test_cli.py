"""The CLI end to end through the real entry point, on a tiny generated dataset."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effitune.cli import app

runner = CliRunner()
FAST = ["--epochs", "8", "--image-size", "64", "--unfreeze", "1", "--batch-size", "16"]


def effitune(*args, env=None):
    return subprocess.run([sys.executable, "-m", "effitune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_dataset_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = effitune("train", tiny_dataset_module, "--out", out, *FAST, "--json",
                      env={"EFFITUNE_CACHE": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout)


def test_train_writes_a_bundle_and_learns(trained):
    out, summary = trained
    bundle = out / "model"
    assert (bundle / "weights.safetensors").is_file() and (bundle / "effitune.json").is_file()
    meta = json.loads((bundle / "effitune.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"]
    assert meta["preprocessing"]["size"] == 64
    assert {p["phase"] for p in meta["phases"]} == {"stage1", "stage2-depth1"}
    # the features the unknown-image score reads: pooled + the pooled input of the stages the best phase trained
    best_depth = 1 if next(p["phase"] for p in meta["phases"] if p["best"]) == "stage2-depth1" else 0
    assert meta["embedding"]["frozen_depth"] == best_depth and meta["embedding"]["pooled_dim"] == 1280
    # knn-frozen standardizes on validation images: this tiny run has fewer than it needs, so knn, said why
    from effitune.ood import MIN_STANDARDIZE

    assert meta["unknown"]["n_val"] < MIN_STANDARDIZE and meta["unknown"]["score"] == "knn"
    assert "validation images" in meta["unknown"]["selected_by"]
    # colour-tinted classes: a working pipeline is far above chance (1/3) on the 9 held-out images
    assert summary["metrics"]["accuracy"] >= 0.75
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("phase,stage,epoch,lr")
    assert len(history) > 2


def test_predict_json_lines_and_bad_file(trained, tiny_dataset_module, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no image here")
    red = next((Path(tiny_dataset_module) / "red").iterdir())
    result = effitune("predict", out / "model", red, broken, "--json", "--top-k", "2")
    assert result.returncode == 1  # one failure -> non-zero, but the good file was still answered
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["path"] == str(red) and lines[0]["top_k"][0]["label"] == "red"
    assert len(lines[0]["top_k"]) == 2 and set(lines[0]["top_k"][0]) == {"label", "probability"}
    assert lines[1]["path"] == str(broken) and "error" in lines[1]


def test_predict_with_nothing_to_predict_says_so(trained, tmp_path):
    out, _ = trained
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(out / "model"), str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no images in" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["predict", str(out / "model"), str(tmp_path / "nomatch*.png")])
    assert result.exit_code == 1 and "no file matches this pattern" in result.output  # like a missing file
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    result = runner.invoke(app, ["predict", str(out / "model"), str(tmp_path / "nomatch*.png"), str(broken), "--json"])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1 and lines[0]["error"] == "no file matches this pattern" and "error" in lines[1]


def test_resume_refuses_settings_it_would_ignore(tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path), "--epochs", "2", "--seed", "3", "--frozen-bn"])
    assert result.exit_code == 2 and "--epochs, --frozen-bn, --seed cannot change them" in " ".join(result.output.split())


def test_resume_refuses_another_out_folder(tmp_path):
    elsewhere = runner.invoke(app, ["train", "--resume", str(tmp_path), "--out", str(tmp_path / "other")])
    assert elsewhere.exit_code == 2 and "--out cannot change them" in " ".join(elsewhere.output.split())
    same = runner.invoke(app, ["train", "--resume", str(tmp_path), "--out", str(tmp_path)])
    assert "--out" not in " ".join(same.output.split())  # naming the run folder twice is fine (it is not a run here)


def test_a_wrong_unknown_dir_is_refused_before_training(tiny_dataset_module, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, fragment in ((tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "holds no images")):
        result = runner.invoke(app, ["train", str(tiny_dataset_module), "--out", str(tmp_path / "run"),
                                     "--unknown-dir", str(folder)])
        assert result.exit_code == 2 and fragment in result.output and not (tmp_path / "run").exists()


def test_calibrate_unknown_learns_from_examples_without_retraining(trained, tmp_path):
    import numpy as np
    from PIL import Image

    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out / "model", run / "model")
    shutil.copy(out / "manifest.csv", run / "manifest.csv")
    weights = (run / "model" / "weights.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    for folder, count in (("examples", 12), ("new", 4)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    result = runner.invoke(app, ["calibrate-unknown", str(run / "model"), "--unknown-dir", str(tmp_path / "examples"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)
    assert section["score"] == "examples" and section["n_unknown_examples"] == 12
    assert json.loads((run / "model" / "effitune.json").read_text())["unknown"] == section
    assert (run / "model" / "weights.safetensors").read_bytes() == weights  # no retraining
    lines = runner.invoke(app, ["predict", str(run / "model"), str(tmp_path / "new"), "--json"]).stdout.splitlines()
    assert [json.loads(line)["score_name"] for line in lines] == ["examples"] * 4
    # mistakes: a manifest of other classes, a folder that is not there
    other = tmp_path / "other.csv"
    other.write_text((run / "manifest.csv").read_text().replace(",red,", ",crimson,"))
    wrong = runner.invoke(app, ["calibrate-unknown", str(run / "model"), "--manifest", str(other)])
    assert wrong.exit_code == 2 and "does not know (crimson)" in " ".join(wrong.output.split())
    missing = runner.invoke(app, ["calibrate-unknown", str(run / "model"), "--unknown-dir", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_a_refused_run_leaves_no_folder_behind(tiny_dataset_module, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_module, data)
    result = runner.invoke(app, ["train", str(data), "--out", str(data / "run")])
    assert result.exit_code == 2 and "inside the data folder" in result.output
    assert not (data / "run").exists()  # it would be read as a class folder next time


def test_paths_that_cannot_be_written_are_one_clear_line(tiny_dataset_module, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    for command in (["train", str(tiny_dataset_module), "--out", str(taken / "run")],
                    ["scan", str(tiny_dataset_module), "--out", str(taken)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert str(taken) in result.output and "Check that the path is right" in result.output
        assert "Traceback" not in result.output


def test_evaluate_manifest_json(trained):
    out, summary = trained
    result = runner.invoke(app, ["evaluate", str(out / "model"), str(out / "manifest.csv"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert set(metrics["per_class"]) == {"blue", "green", "red"}
    assert 0 < summary["metrics"]["train_seconds"] <= summary["metrics"]["wall_seconds"]


def test_evaluate_a_folder_honours_its_splits_and_warns_about_training_images(trained, tiny_dataset_module, tmp_path):
    out, _ = trained
    bundle = str(out / "model")
    whole = runner.invoke(app, ["evaluate", bundle, str(tiny_dataset_module), "--json"])
    metrics = json.loads(whole.stdout)
    assert whole.exit_code == 0 and metrics["trained_on"] > 0
    assert f"warning: {metrics['trained_on']} of the {metrics['n']} images" in " ".join(whole.stderr.split())
    assert "UserWarning" not in whole.stderr  # one CLI line, not Python's warning format
    shutil.copytree(tiny_dataset_module, tmp_path / "copied")  # the same images elsewhere: found by content
    copied = json.loads(runner.invoke(app, ["evaluate", bundle, str(tmp_path / "copied"), "--json"]).stdout)
    assert copied["trained_on"] == metrics["trained_on"]
    refused = runner.invoke(app, ["evaluate", bundle, str(tiny_dataset_module), "--split", "test"])
    assert refused.exit_code == 2 and "is not split" in refused.output
    split = tmp_path / "split"
    for part, colours in (("train", ("red", "green", "blue")), ("test", ("red",))):
        for colour in colours:
            shutil.copytree(Path(tiny_dataset_module) / colour, split / part / colour)
    test_only = json.loads(runner.invoke(app, ["evaluate", bundle, str(split), "--json"]).stdout)
    assert test_only["n"] == len(list((Path(tiny_dataset_module) / "red").iterdir()))  # one class: fine
    assert json.loads(runner.invoke(app, ["evaluate", bundle, str(split), "--split", "train", "--json"]).stdout)["n"] \
        == metrics["n"]
    labelled = [f"{path},{path.parent.name},{'test' if i % 2 else 'train'}"  # a CSV with a split column
                for i, path in enumerate(sorted(Path(tiny_dataset_module).rglob("*.png")))]
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "\n".join(labelled) + "\n")
    from_csv = json.loads(runner.invoke(app, ["evaluate", bundle, str(tmp_path / "labels.csv"), "--json"]).stdout)
    assert from_csv["n"] == len(labelled) // 2


def test_report_and_audit_read_a_plain_csv_as_evaluate_does(trained, tiny_dataset_module, tmp_path):
    """One reader for every verb: a `path,label,split` CSV (no manifest columns) is scanned, not refused."""
    out, _ = trained
    bundle = str(out / "model")
    images = sorted(Path(tiny_dataset_module).rglob("*.png"))
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label,split\n" + "".join(f"{path},{path.parent.name},{'test' if i % 2 else 'train'}\n"
                                                   for i, path in enumerate(images)))
    report = runner.invoke(app, ["report", bundle, str(plain), "--out", str(tmp_path / "report"), "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["data"] == str(plain.resolve())
    assert (tmp_path / "report" / "report.html").is_file()
    audit = runner.invoke(app, ["audit", str(plain), "--model", bundle, "--out", str(tmp_path / "scan"), "--json"])
    assert audit.exit_code == 0, audit.output
    model_audit = json.loads(audit.stdout)["model_audit"]
    assert model_audit["n"] == len(images)


def test_backend_option_reaches_every_command_that_runs_the_model(trained, tiny_dataset_module, monkeypatch):
    from effitune import predict as predict_module

    out, _ = trained
    bundle, red = str(out / "model"), str(next((Path(tiny_dataset_module) / "red").iterdir()))
    commands = [["predict", bundle, red], ["evaluate", bundle, str(out / "manifest.csv")], ["drift", bundle, red],
                ["ood-eval", bundle, "--known", str(out / "manifest.csv"), "--unknown", red], ["serve", bundle]]
    for command in commands:  # no model.int8.onnx in this bundle: one line naming the export, nothing served
        result = runner.invoke(app, [*command, "--backend", "int8"])
        assert result.exit_code == 2 and "effitune export" in result.output and "--int8" in result.output, command
    chosen = []
    monkeypatch.setattr(predict_module, "load",
                        lambda *a, load=predict_module.load, **k: chosen.append(k["backend"]) or load(*a, **k))
    result = runner.invoke(app, ["predict", bundle, red, "--json", "--backend", "torch"])
    assert result.exit_code == 0 and json.loads(result.stdout)["label"] == "red" and chosen == ["torch"]


@pytest.mark.parametrize("args, fragment", [
    (["train", "{missing}"], "does not exist"),
    (["predict", "{empty}", "x.png"], "not an effitune model bundle"),
    (["train", "{data}", "--config", "{missing}"], "does not exist"),
    (["train", "{data}", "--unfreeze", "lots"], "must be auto"),
])
def test_user_errors_are_one_clear_line(args, fragment, tmp_path, tiny_dataset_module):
    values = {"missing": tmp_path / "nope", "empty": tmp_path, "data": tiny_dataset_module}
    result = runner.invoke(app, [a.format(**values) for a in args] + ["--out", str(tmp_path / "o")]
                           if args[0] == "train" else [a.format(**values) for a in args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_ctrl_c_during_training_says_how_to_resume(tiny_dataset_module, tmp_path):
    """Lightning catches Ctrl-C and exits 1 silently; effitune exits 130 and names the command to go on."""
    out = tmp_path / "run"
    env = {**os.environ, "EFFITUNE_CACHE": str(tmp_path / "cache"), "SIGNAL_AT": "SIGINT stage1 1"}
    args = [sys.executable, "-c", SIGNAL_DURING_TRAINING, "train", str(tiny_dataset_module), "--out", str(out),
            "--epochs", "30", "--image-size", "64", "--unfreeze", "1", "--batch-size", "16"]
    # as from a terminal: a job started in the background of a script (CI) inherits SIGINT ignored
    process = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (out / "checkpoints" / "stage1" / "last.ckpt").is_file(), "stage 1 never checkpointed"
    assert process.returncode == 130, process.stderr[-2000:]
    assert f"effitune train --resume {out}" in " ".join(process.stderr.split()) and "Traceback" not in process.stderr


# Runs `effitune train` and signals its own process (SIGKILL: no cleanup, as `kill -9` or a lost machine;
# SIGINT: Ctrl-C) once, at the start of epoch E of phase P (env SIGNAL_AT="SIGNAL P E"): epochs before E are
# checkpointed, and early stopping (patience 3) cannot have ended the phase by epoch 2. The moment is
# fixed by the training's own progress, never by a clock.
SIGNAL_DURING_TRAINING = """
import os, signal, sys
from effitune.training.callbacks import HistoryWriter

name, phase, epoch = os.environ.pop("SIGNAL_AT").split()
started = HistoryWriter.on_train_epoch_start

def signal_once(self, trainer, pl_module):
    global phase
    if self.phase_name == phase and trainer.current_epoch == int(epoch):
        phase = None
        os.kill(os.getpid(), getattr(signal, name))
    started(self, trainer, pl_module)

HistoryWriter.on_train_epoch_start = signal_once
from effitune.cli import app
sys.argv = ["effitune", *sys.argv[1:]]
app()
"""


def test_resume_after_kill(tiny_dataset_module, tmp_path):
    """kill -9 in the middle of stage 2, then --resume finishes from the checkpoints."""
    out = tmp_path / "run"
    env = {**os.environ, "EFFITUNE_CACHE": str(tmp_path / "cache"), "SIGNAL_AT": "SIGKILL stage2-depth1 2"}
    args = [sys.executable, "-c", SIGNAL_DURING_TRAINING, "train", str(tiny_dataset_module), "--out", str(out),
            "--epochs", "30", "--image-size", "64", "--unfreeze", "1", "--batch-size", "16"]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = out / "checkpoints" / "stage2-depth1" / "last.ckpt"
    assert last.is_file(), "stage 2 never checkpointed"
    state = json.loads((out / "state.json").read_text())
    assert "stage1" in state["done"] and "stage2-depth1" not in state["done"]
    assert not (out / "model" / "effitune.json").exists()
    result = effitune("train", "--resume", out, env={"EFFITUNE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert "stage2-depth1" in state["done"]
    assert (out / "model" / "effitune.json").is_file()
    # the resumed phase continued its epoch count instead of starting over
    rows = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    epochs = [int(r[2]) for r in rows if r[0] == "stage2-depth1"]
    assert epochs[:2] == [0, 1] and epochs == sorted(epochs) and len(epochs) == len(set(epochs)) > 2
    metrics = (out / "metrics.json").read_bytes()
    again = runner.invoke(app, ["train", "--resume", str(out)])
    assert again.exit_code == 2 and "is finished already" in again.output
    assert (out / "metrics.json").read_bytes() == metrics  # its timing is not rewritten


def test_split_warns_about_a_class_folder_it_leaves_out(tmp_path):
    from conftest import make_image_tree

    make_image_tree(tmp_path / "data", {"cat": 8, "dog": 8})
    (tmp_path / "data" / "phone").mkdir()
    (tmp_path / "data" / "phone" / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    result = runner.invoke(app, ["split", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "'phone' has no usable images (1 rejected" in " ".join(result.output.split())


def test_split_warns_when_the_same_image_sits_in_two_classes(tmp_path):
    from conftest import make_image_tree

    written = make_image_tree(tmp_path / "data", {"cat": 8, "dog": 8})
    shutil.copy(written["cat"][2], tmp_path / "data" / "dog" / "stolen.png")
    result = runner.invoke(app, ["split", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "1 group of look-alike images spans several classes" in output
    assert "stolen.png (dog)" in output and f"effitune audit {tmp_path / 'data'}" in output


def test_error_messages_keep_their_square_brackets(tmp_path):
    """Rich reads [words] as markup: an error naming `effitune[weights]` or a folder `photos [old]` kept its text
    only once escaped."""
    result = runner.invoke(app, ["predict", str(tmp_path / "photos [old]"), "x.png"])
    assert result.exit_code == 2 and "photos [old] does not exist" in result.output


def test_models_table_keeps_names_whole_at_80_columns():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "tf_efficientnet_lite0" in result.output and "packaged" in result.output
    assert "True" not in result.output and "None" not in result.output


def test_class_names_with_brackets_survive_the_tables(tmp_path):
    from conftest import make_image_tree

    make_image_tree(tmp_path / "data", {"cat [old]": 8, "dog": 8})
    result = runner.invoke(app, ["scan", str(tmp_path / "data"), "--out", str(tmp_path / "out")], env={"COLUMNS": "150"})
    assert result.exit_code == 0 and "cat [old]" in result.output


def test_scan_names_the_rejected_files_20_in_its_table_all_in_json(tmp_path):
    from conftest import make_image_tree

    make_image_tree(tmp_path / "data", {"cat": 8, "dog": 8})
    broken = [tmp_path / "data" / "cat" / f"broken_{i:02d}.jpg" for i in range(23)]
    for path in broken:
        path.write_bytes(b"not an image at all")
    result = runner.invoke(app, ["scan", str(tmp_path / "data"), "--out", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    listed = [path.name for path in broken if path.name in result.output]
    assert len(listed) == 20 and "and 3 more" in result.output and "not an image" in result.output
    result = runner.invoke(app, ["scan", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--json"])
    rejected = json.loads(result.stdout)["rejected_files"]
    assert sorted(Path(row["path"]).name for row in rejected) == sorted(path.name for path in broken)
    assert {row["reason"] for row in rejected} == {"not an image"} and all(row["label"] == "cat" for row in rejected)


def test_audit_lists_poor_images_in_its_table_and_json_without_a_model(tmp_path):
    from conftest import make_colour_dataset
    from PIL import Image

    data = make_colour_dataset(tmp_path / "data", per_class=50)
    with Image.open(data / "red" / "red_000.png") as image:
        Image.eval(image.convert("RGB"), lambda value: value // 4).save(data / "red" / "underexposed.png")
    as_json = runner.invoke(app, ["audit", str(data), "--out", str(tmp_path / "scan"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)["quality_issues"]
    assert {Path(row["path"]).name for row in rows} == {"underexposed.png"}  # a quarter of the light: 2 bits less too
    assert [(row["kind"], row["label"]) for row in rows] == [("dark", "red"), ("low_information", "red")]
    table = runner.invoke(app, ["audit", str(tmp_path / "scan" / "records.jsonl")], terminal_width=200)
    assert table.exit_code == 0 and "Image quality: 2 findings (1 dark, 1 low information)" in table.output
    assert "underexposed.png" in "".join(ch for ch in table.output if ch.isascii() and not ch.isspace())  # folded
