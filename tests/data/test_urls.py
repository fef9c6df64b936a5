"""Images listed as URLs (fsspec's memory:// and file://) through scan, the cache, predict and evaluate."""
import csv
import hashlib
import io
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import random_image
from test_bundle import save_random_bundle

import effitune.data.cache as cache_module
from effitune.batch_predict import predict_to_file
from effitune.data.cache import ImageCache
from effitune.data.images import is_url, load_for_model
from effitune.data.scan import iter_records, scan
from effitune.errors import UserError
from effitune.evaluate.evaluate import evaluate_bundle
from effitune.predict import Predictor, expand_sources


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def memory_images():
    """Eight PNGs at memory://<unique>/{a,b}/N.png (four per label); removed afterwards."""
    fs, root = fsspec.filesystem("memory"), f"/effitune-{uuid.uuid4().hex[:8]}"
    urls = {}
    for i in range(8):
        label = "ab"[i % 2]
        fs.pipe(f"{root}/{label}/{i}.png", png(i))
        urls[f"memory://{root}/{label}/{i}.png"] = label
    yield urls
    fs.rm(root, recursive=True)


def write_csv(path: Path, rows: list[tuple[str, ...]], header=("path", "label")) -> Path:
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("urls") / "model"
    save_random_bundle(folder, classes=("a", "b", "c"), size=32)
    return Predictor(folder)


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/a.jpg", True), ("memory://x/a.png", True), ("file:///tmp/a.png", True),
    ("https://example.com/a.jpg?sig=1", True), ("/tmp/a.png", False), ("a.png", False),
    ("C:\\photos\\a.png", False), ("c://a.png", False), (Path("/tmp/a.png"), False),
])
def test_what_counts_as_a_url(text, expected):
    assert is_url(text) is expected


def test_scan_a_csv_of_urls_with_a_missing_one(memory_images, tmp_path):
    rows = [*memory_images.items(), (next(iter(memory_images)).replace("0.png", "gone.png"), "a")]
    result = scan(write_csv(tmp_path / "labels.csv", rows), out=tmp_path / "out", workers=1, progress=False)
    assert result.per_class == {"a": 4, "b": 4} and result.reasons == {"missing file": 1}
    records = {r["path"]: r for r in iter_records(result.records_path)}
    first = next(iter(memory_images))
    assert records[first]["status"] == "ok" and records[first]["format"] == "PNG"
    assert records[first]["sha1"] == hashlib.sha1(fsspec.filesystem("memory").cat(first)).hexdigest()
    assert records[rows[-1][0]]["reason"] == "missing file"


def test_scan_file_urls_and_local_paths_side_by_side(tmp_path):
    for i in range(4):
        random_image(i).save(tmp_path / f"{i}.png")
    rows = [((tmp_path / "0.png").as_uri(), "a"), ((tmp_path / "1.png").as_uri(), "b"), ("2.png", "a"), ("3.png", "b")]
    result = scan(write_csv(tmp_path / "labels.csv", rows), out=tmp_path / "out", workers=1, progress=False)
    assert result.per_class == {"a": 2, "b": 2}
    paths = sorted(r["path"] for r in iter_records(result.records_path))
    assert paths[:2] == [str(tmp_path / "2.png"), str(tmp_path / "3.png")]  # local: absolute, no fsspec
    assert paths[2:] == [(tmp_path / "0.png").as_uri(), (tmp_path / "1.png").as_uri()]  # URLs: kept as given


def test_cache_builds_from_urls_and_trusts_their_stamp(memory_images, tmp_path, monkeypatch):
    urls = list(memory_images)
    keys = ImageCache(tmp_path / "cache", 24).build(urls, workers=1)
    assert np.array_equal(ImageCache(tmp_path / "cache", 24).get(keys[3]), load_for_model(png(3), 24))
    monkeypatch.setattr(cache_module, "read_bytes", lambda *a: pytest.fail("fetched again"))
    assert ImageCache(tmp_path / "cache", 24).build(urls, keys, workers=1) == keys


def test_predict_urls_streams_with_a_clear_error_for_a_missing_one(memory_images, predictor, tmp_path):
    urls = list(memory_images)
    missing = urls[0].replace("0.png", "gone.png")
    results = predictor.predict([*urls, missing])
    assert [r["path"] for r in results] == [*urls, missing]
    assert np.allclose(results[1]["probability"], predictor.predict([png(1)])[0]["probability"])
    assert results[-1] == {"path": missing, "error": "could not fetch it: no such address, or this machine cannot "
                                                     "reach it"}
    summary = predict_to_file(predictor, [*urls, missing], tmp_path / "out.jsonl", batch_size=3)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == results and summary.errors == 1


def test_urls_pass_through_expansion_untouched():
    url = "https://example.com/photos/a.jpg?size=[large]*"  # glob characters in a query string
    assert list(expand_sources([url])) == [url]


def test_evaluate_a_manifest_of_urls(memory_images, predictor, tmp_path):
    header = ("path", "label", "split", "sha1", "width", "height")
    rows = [(url, label, "test", "", "40", "32") for url, label in memory_images.items()]
    metrics = evaluate_bundle(predictor.folder, write_csv(tmp_path / "manifest.csv", rows, header), predictor=predictor)
    assert metrics["n"] == 8
    gone = next(iter(memory_images)).replace("0.png", "gone.png")
    manifest = write_csv(tmp_path / "manifest.csv", [*rows, (gone, "a", "test", "", "40", "32")], header)
    with pytest.raises(UserError, match="gone.png .*cannot be read: it does not exist"):
        evaluate_bundle(predictor.folder, manifest, predictor=predictor)
