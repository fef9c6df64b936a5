"""Streaming prediction into a file: flat memory, input order, error rows, shards that merge."""
import csv
import json
import tracemalloc
from pathlib import Path

import pytest
from conftest import random_image
from test_bundle import save_random_bundle
from typer.testing import CliRunner

from effitune.batch_predict import merge_parts, parse_shard, part_path, predict_to_file, shard_from_env
from effitune.cli import app
from effitune.errors import UserError
from effitune.predict import Predictor

runner = CliRunner()


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{start + i:03d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        random_image(start + i).save(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight bundle at 64 px and a folder of 11 images with one broken file among them."""
    root = tmp_path_factory.mktemp("batch")
    save_random_bundle(root / "model", size=64)
    images = root / "images"
    write_images(images / "a", 6)
    write_images(images / "b", 4, start=6)
    (images / "b" / "img_005_broken.png").write_bytes(b"not an image")
    return Predictor(root / "model"), images


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_jsonl_is_predict_in_input_order_with_an_error_row(setup, tmp_path):
    predictor, images = setup
    missing = tmp_path / "missing.png"
    sources = [images, missing]
    summary = predict_to_file(predictor, sources, tmp_path / "out.jsonl", top_k=2, batch_size=4)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows == predictor.predict(sources, top_k=2)
    assert [Path(row["path"]).name for row in rows][5:8] == ["img_005.png", "img_005_broken.png", "img_006.png"]
    assert "error" in rows[6] and rows[-1] == {"path": str(missing), "error": "file not found"}
    assert (summary.rows, summary.errors, summary.merged) == (12, 2, True)


def test_csv_has_a_column_per_field_and_per_rank(setup, tmp_path):
    predictor, images = setup
    predict_to_file(predictor, [images], tmp_path / "out.csv", top_k=2, batch_size=4)
    rows, expected = read_csv(tmp_path / "out.csv"), predictor.predict([images], top_k=2)
    assert list(rows[0]) == ["path", "label", "probability", "unknown", "unknown_score", "error",
                             "label_1", "probability_1", "label_2", "probability_2"]
    assert [row["path"] for row in rows] == [result["path"] for result in expected]
    for row, result in zip(rows, expected):
        if "error" in result:
            assert row["error"].startswith("cannot read image") and row["label"] == row["label_1"] == ""
            continue
        assert row["label"] == result["label"] == row["label_1"] and row["error"] == ""
        assert float(row["probability"]) == result["probability"]  # full precision, not rounded
        assert float(row["probability_2"]) == result["top_k"][1]["probability"]


def test_an_interrupted_job_leaves_a_valid_partial_file(setup, tmp_path):
    predictor, images = setup

    def stop_after_first_batch(rows):
        raise KeyboardInterrupt

    for name in ("out.csv", "out.jsonl"):
        with pytest.raises(KeyboardInterrupt):
            predict_to_file(predictor, [images], tmp_path / name, batch_size=4, progress=stop_after_first_batch)
    assert len(read_csv(tmp_path / "out.csv")) == 4
    assert [row["path"] for row in read_jsonl(tmp_path / "out.jsonl")] == \
        [row["path"] for row in predictor.predict([images])][:4]


def traced_peak(run) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images(setup, tmp_path):
    """Peak traced memory for 4N images is that of N images: nothing per image is kept.

    Holding the decoded images would cost 12 KB each (64x64x3), the pooled features 5 KB, even the
    result dicts about 1 KB; streaming costs only the folder listing (~0.2 KB a name).
    """
    predictor, _ = setup
    small, large = tmp_path / "small", tmp_path / "large"
    write_images(small, 16)
    write_images(large, 64)
    run = lambda folder: predict_to_file(predictor, [folder], tmp_path / "out.jsonl", batch_size=8)  # noqa: E731
    traced_peak(lambda: run(small))  # warm up: first-call allocations are not per image
    growth = traced_peak(lambda: run(large)) - traced_peak(lambda: run(small))
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 16
    assert growth / (64 - 16) < 512, f"{growth} bytes more for 48 more images"


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_two_shards_merge_into_the_unsharded_output(setup, tmp_path, name):
    predictor, images = setup
    sources = [images, tmp_path / "missing.png"]
    out = tmp_path / name
    # batch_size 1: every image alone in its batch, so the floats cannot depend on the batch's company
    predict_to_file(predictor, sources, tmp_path / f"whole{out.suffix}", batch_size=1)
    first = predict_to_file(predictor, sources, out, batch_size=1, shard=(1, 2))
    assert not first.merged and not out.exists() and first.rows == 6
    part = part_path(out, 1, 2).read_text().splitlines()
    assert part[0].startswith("index,path") if name.endswith(".csv") else json.loads(part[0])["index"] == 1
    second = predict_to_file(predictor, sources, out, batch_size=1, shard=(0, 2))
    assert second.merged and "merged into" in second.describe()
    assert out.read_text() == (tmp_path / f"whole{out.suffix}").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"whole{out.suffix}"])


def test_shards_of_different_inputs_are_not_merged(setup, tmp_path):
    predictor, images = setup
    out = tmp_path / "out.jsonl"
    predict_to_file(predictor, [images], out, shard=(0, 2))
    with pytest.raises(UserError, match="other inputs or options"):
        predict_to_file(predictor, [images / "a"], out, shard=(1, 2))
    assert not out.exists() and part_path(out, 0, 2).exists()


def test_whichever_shard_finishes_last_merges(setup, tmp_path):
    predictor, images = setup
    out = tmp_path / "out.csv"
    for shard in ((0, 3), (2, 3)):
        predict_to_file(predictor, [images], out, shard=shard)
    predict_to_file(predictor, [images], out, shard=(0, 3))  # a rerun of a finished shard is harmless
    assert not out.exists()
    assert predict_to_file(predictor, [images], out, shard=(1, 3)).merged
    assert [row["path"] for row in read_csv(out)] == [r["path"] for r in predictor.predict([images])]


def test_merge_parts_names_the_missing_part(tmp_path):
    with pytest.raises(UserError, match=r"out.csv.part-1-of-2 missing"):
        part_path(tmp_path / "out.csv", 0, 2).write_text("index,path\n")
        merge_parts(tmp_path / "out.csv", 2)


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert shard_from_env() is None  # not started by a launcher: RANK alone means nothing
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert shard_from_env() == (3, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK='3'"):
        shard_from_env()


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_shard_is_a_user_error(text):
    with pytest.raises(UserError, match="I/N"):
        parse_shard(text)


def test_cli_writes_the_file_and_merges_shards(setup, tmp_path, monkeypatch):
    predictor, images = setup
    bundle, out = predictor.folder, tmp_path / "out.csv"
    whole = runner.invoke(app, ["predict", str(bundle), str(images), "--out", str(tmp_path / "whole.csv"),
                                "--batch-size", "1"])
    assert whole.exit_code == 1 and "11 images (1 could not be read)" in whole.stderr  # the broken file
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for rank in ("0", "1"):  # as torchrun would start them
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = runner.invoke(app, ["predict", str(bundle), str(images), "--out", str(out), "--batch-size", "1"])
        assert f"shard {rank}/2" in result.stderr
    assert "merged into" in result.stderr
    assert out.read_text() == (tmp_path / "whole.csv").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--out", "{tmp}/out.txt"], "end the name in .csv"),
    (["--shard", "0/2"], "add --out FILE"),
    (["--shard", "3/2", "--out", "{tmp}/x.csv"], "0 <= I < N"),
    (["--device", "gpu0"], "not a device"),
])
def test_cli_user_errors(setup, tmp_path, args, fragment):
    predictor, images = setup
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = runner.invoke(app, ["predict", str(predictor.folder), str(images), *args])
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr


def test_one_source_is_one_source_not_its_characters(setup, tmp_path, monkeypatch):
    """predict("photo.png") and predict(Path) as a notebook user types them: never character by character
    (the '/' of an absolute path is a folder: the whole disk; relative names here keep a failure small)."""
    predictor, images = setup
    monkeypatch.chdir(images / "a")
    as_list = predictor.predict(["img_000.png"])
    assert predictor.predict("img_000.png") == predictor.predict(Path("img_000.png")) == as_list
    assert predictor.predict(Path("img_000.png").read_bytes())[0]["label"] == as_list[0]["label"]
    monkeypatch.chdir(images)
    assert [r["path"] for r in predictor.predict("b")] == [r["path"] for r in predictor.predict(["b"])]
    assert predict_to_file(predictor, "a", tmp_path / "out.csv").rows == 6


def test_pil_images_and_arrays_are_predicted_like_their_files(setup):
    import numpy as np
    from PIL import Image

    predictor, images = setup
    files = sorted((images / "a").glob("*.png"))[:3]
    expected = [r["probability"] for r in predictor.predict(files)]
    pil = [Image.open(path) for path in files]
    arrays = [np.asarray(image.convert("RGB")) for image in pil]
    assert [r["probability"] for r in predictor.predict(pil)] == pytest.approx(expected, abs=1e-6)
    assert [r["probability"] for r in predictor.predict(arrays)] == pytest.approx(expected, abs=1e-6)
    assert [r["probability"] for r in predictor.predict(np.stack(arrays))] == pytest.approx(expected, abs=1e-6)
    assert predictor.predict(pil[0])[0]["path"].startswith("<PIL image")
    grey = predictor.predict(np.asarray(pil[0].convert("L")))[0]
    assert "label" in grey and grey["path"].startswith("<array uint8")
    wrong = predictor.predict([arrays[0].astype(np.float32) / 255, arrays[1]])
    assert "must be uint8" in wrong[0]["error"] and "label" in wrong[1]


@pytest.mark.parametrize("make, fragment", [
    (lambda a: a.astype("float32"), "got float32"),
    (lambda a: a.astype("int64"), "got int64"),
    (lambda a: a[0], "add the batch axis"),
    (lambda a: a[:, :32, :32], "(1, 32, 32, 3)"),
    (lambda a: a.transpose(0, 3, 1, 2), "(1, 3, 64, 64)"),
    (lambda a: a.tolist(), "got int64"),
])
def test_the_array_api_refuses_what_it_would_get_wrong(setup, make, fragment):
    predictor, images = setup
    batch = predictor.preprocess(images / "a" / "img_000.png")[None]
    predictor.probabilities(batch)  # the right input works
    for call in (predictor.run, predictor.logits, predictor.probabilities):
        with pytest.raises(UserError, match="take uint8 images of shape \\(N, 64, 64, 3\\)") as caught:
            call(make(batch))
        assert fragment in str(caught.value)


def test_top_k_below_one_is_refused(setup, tmp_path):
    predictor, images = setup
    with pytest.raises(UserError, match="at least 1"):
        predictor.predict([images], top_k=0)
    with pytest.raises(UserError, match="at least 1"):
        predict_to_file(predictor, [images], tmp_path / "x.csv", top_k=0)
    result = runner.invoke(app, ["predict", str(predictor.folder), str(images), "--top-k", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_an_empty_folder_leaves_no_output_file(setup, tmp_path):
    predictor, _ = setup
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(predictor.folder), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "no images in" in result.output and not (tmp_path / "p.csv").exists()


def test_a_very_large_photo_is_predicted_without_pillows_warning(setup):
    """Pillow warns about images over MAX_IMAGE_PIXELS (89 MP: a 108-MP phone photo); predict reads them
    quietly and Pillow's refusal at twice that stays a per-file error. The limit is lowered here."""
    import subprocess
    import sys

    predictor, images = setup
    code = ("import json, sys\nfrom PIL import Image\nImage.MAX_IMAGE_PIXELS = 5000\nimport effitune\n"
            "from effitune.predict import Predictor\n"
            "results = Predictor(sys.argv[1]).predict(sys.argv[2:])\n"
            "print(json.dumps([sorted(r) for r in results]))")
    big, huge = images.parent / "6000px.png", images.parent / "12000px.png"
    random_image(1, (100, 60)).save(big)  # over the limit, under twice it: read
    random_image(2, (120, 100)).save(huge)  # over twice the limit: refused
    done = subprocess.run([sys.executable, "-c", code, str(predictor.folder), str(big), str(huge)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DecompressionBomb" not in done.stderr
    first, second = json.loads(done.stdout)
    assert "label" in first and second == ["error", "path"]
