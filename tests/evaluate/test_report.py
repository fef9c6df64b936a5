"""The training report: written by `train()`, self-contained, consistent with the bundle's numbers."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import effitune
from conftest import make_colour_dataset
from effitune.cli import app
from effitune.evaluate import plots
from effitune.evaluate.report import (Evaluation, confident_mistakes, most_confused, report_after_training,
                                      write_report)

SECTIONS = ("summary", "curves", "metrics", "mistakes", "calibration", "audit", "splits")
runner = CliRunner()


def trained_run(tmp_path_factory) -> Path:
    """One tiny real run per session (32 px, 2 + 1 epochs), shared with test_report_page.py."""
    root = tmp_path_factory.getbasetemp() / "report-run"
    run = root / "run"
    if not (run / "model" / "effitune.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        data = make_colour_dataset(root / "data", per_class=20)
        config = effitune.load_config(overrides={"train.stage1.epochs": 2, "train.stage2.epochs": 1,
                                                 "train.unfreeze": "1", "data.image_size": 32,
                                                 "train.batch_size": 16, "data.workers": 1})
        effitune.train(data, out=run, config=config, cache_root=root / "cache", progress=False)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def test_training_writes_the_report(run):
    folder = run / "report"
    summary = json.loads((folder / "report.json").read_text())
    assert (folder / "report.html").is_file()
    assert {"curves", "confusion", "reliability", "splits", "shortcuts"} <= {Path(f).stem for f in summary["figures"]}
    for name in summary["figures"]:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 100
    # the same numbers as training's own evaluation of the same bundle on the same test split
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["evaluated_on"] == "test" and summary["n_evaluated"] == metrics["n"]
    assert summary["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert summary["calibration"]["after"]["ece"] == pytest.approx(metrics["test_ece"], abs=1e-6)
    meta = json.loads((run / "model" / "effitune.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(meta["temperature"])
    assert summary["splits"] == meta["split_counts"]
    assert summary["audit"]["n"] == sum(sum(c.values()) for c in meta["split_counts"].values())


def test_html_is_self_contained(run):
    page = (run / "report" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)  # nothing fetched
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(json.loads((run / "report" / "report.json").read_text())["figures"])
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.verify()


def test_report_failure_warns_and_keeps_the_bundle(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / "model", copy / "model")  # no manifest.csv beside it: the report cannot run
    with pytest.warns(UserWarning, match="report was not written.*bundle is complete"):
        assert report_after_training(copy) is None
    assert effitune.load(copy / "model").classes == ["blue", "green", "red"]


def test_cli_report_on_a_data_folder(run, tmp_path):
    result = runner.invoke(app, ["report", str(run / "model"), str(run.parent / "data"), "--out", str(tmp_path),
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["evaluated_on"] == "all" and summary["n_evaluated"] == 60
    assert any("No test split" in w for w in summary["warnings"])
    assert (tmp_path / "report.html").is_file() and (tmp_path / "confusion.png").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["report", "{empty}"], "not an effitune model bundle"),
    (["report", "{lonely}"], "No data to report on"),
    (["report", "{bundle}", "{missing}"], "does not exist"),
])
def test_cli_report_user_errors(args, fragment, run, tmp_path):
    lonely = tmp_path / "lonely" / "model"
    shutil.copytree(run / "model", lonely)
    values = {"empty": tmp_path, "lonely": lonely, "bundle": run / "model", "missing": tmp_path / "nope"}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_most_confused_and_confident_mistakes():
    classes = ["a", "b", "c"]
    pairs = most_confused([[5, 3, 0], [1, 6, 0], [0, 4, 2]], classes)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 4), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[0]["share_of_true"] == pytest.approx(4 / 6)
    probabilities = np.array([[.9, .1, 0], [.2, .7, .1], [.1, .1, .8], [.05, .05, .9]])
    evaluation = Evaluation("test", np.arange(4), np.array([0, 0, 0, 2]), probabilities, probabilities)
    rows = [{"path": f"p{i}"} for i in range(4)]
    mistakes = confident_mistakes(evaluation, rows, classes)
    assert [(m["path"], m["predicted"]) for m in mistakes] == [("p2", "c"), ("p1", "b")]  # surest first


def test_training_curves_mark_every_phase():
    history = [{"phase": phase, "stage": stage, "epoch": e, "lr": 1e-3, "train_loss": 1 / (e + 1),
                "train_acc": 0.5, "val_loss": "", "val_acc": 0.6}
               for phase, stage in (("stage1", 1), ("stage2-depth1", 2), ("stage2-depth2", 2)) for e in range(3)]
    figure = plots.training_curves(history)
    loss_axis = figure.axes[0]
    boundaries = [line for line in loss_axis.get_lines() if line.get_linestyle() == "--"]
    assert len(boundaries) == 2  # two phase starts after the first
    assert {t.get_text() for t in loss_axis.texts} == {"stage1", "depth1", "depth2"}
    assert plots.png(figure)[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_names_the_font_lacks_draw_without_warnings(recwarn):
    figure = plots.confusion_matrix([[3, 1], [0, 4]], ["\u732b", "\u72ac"])  # cat, dog in Chinese
    assert plots.png(figure)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


def test_a_handed_over_pass_is_used_only_when_it_covers_the_rows(run, tmp_path, monkeypatch):
    from effitune.data.sources import read_source
    from effitune.evaluate import report
    from effitune.predict import Predictor

    rows = read_source(run / "manifest.csv").rows
    embedded = report.embed(Predictor(run / "model"), rows)
    logits, features = embedded.logits, embedded.features
    paths = [row["path"] for row in rows]
    calls = []
    original = report.embed
    monkeypatch.setattr(report, "embed", lambda *a, **k: calls.append(1) or original(*a, **k))
    wrong = -logits  # every prediction changes: the report shows which logits it read
    write_report(run / "model", out=tmp_path / "handed", embedded=report.Embedded(paths, wrong, features))
    handed = json.loads((tmp_path / "handed" / "report.json").read_text())
    assert not calls and handed["metrics"]["accuracy"] < json.loads((run / "metrics.json").read_text())["accuracy"]
    write_report(run / "model", out=tmp_path / "other", embedded=report.Embedded(paths[::-1], wrong, features))
    other = json.loads((tmp_path / "other" / "report.json").read_text())  # other rows: computed afresh
    assert calls == [1] and other["metrics"]["accuracy"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["accuracy"])


def test_the_quality_gallery_shows_each_kind_from_the_scan_records(tmp_path):
    """No model: the file-level audit's findings on the scan records, thumbnails of each kind in turn."""
    from effitune.data.sources import read_source
    from effitune.evaluate.report import Thumbnails, _quality_html, quality_gallery, quality_shown, quality_summary

    data = make_colour_dataset(tmp_path / "data", per_class=50)
    with Image.open(data / "red" / "red_000.png") as image:
        image.convert("L").save(data / "red" / "grey.png")
        image.resize((image.width * 3, image.height * 3)).save(data / "red" / "large.png")
    source = read_source(data)
    quality = quality_summary(source.rows, source.records)
    assert quality["measured"] == 152 and quality["counts"] == {"odd_size": 1, "grayscale": 1}
    assert [Path(q["path"]).name for q in quality_shown(quality["issues"])] == ["large.png", "grey.png"]
    gallery = quality_gallery(quality, Thumbnails(source.rows, None, 32))
    with Image.open(io.BytesIO(gallery)) as image:
        assert image.format == "PNG" and image.width > 200
    page = _quality_html(quality, {"quality": gallery})
    assert 'data-figure="quality"' in page and "grey.png" in page and "1 odd size, 1 grayscale" in page
    assert quality_summary(source.rows, None) is None and "Skipped" in _quality_html(None, {})
    shown = quality_shown([{"kind": k, "n": n} for k in ("dark", "blurry") for n in range(10)], limit=4)
    assert [(q["kind"], q["n"]) for q in shown] == [("dark", 0), ("blurry", 0), ("dark", 1), ("blurry", 1)]


def test_the_training_report_has_the_quality_section(run):
    summary = json.loads((run / "report" / "report.json").read_text())
    assert summary["quality"]["measured"] == summary["audit"]["n"]  # every image of the run's scan measured
    assert '<h3 id="quality">' in (run / "report" / "report.html").read_text()
