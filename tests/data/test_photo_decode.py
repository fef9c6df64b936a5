"""Photos decoded once, at the size they are needed: reduced JPEG decoding, the scan filling the cache."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from effitune.config import DataConfig
from effitune.data import images
from effitune.data.cache import ImageCache
from effitune.data.images import load_for_model, load_rgb, resize_center_crop
from effitune.data.scan import check_and_resize, iter_records, scan


def photo(seed: int, size=(1600, 1200)) -> Image.Image:
    """A photo-like image: smooth gradients and shapes plus sensor noise (JPEG-typical content)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 100 * np.sin(x / (90 + 40 * c) + y / (130 + 20 * c) + phase[c]) for c in range(3)], -1)
    noisy = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg(path, image: Image.Image, orientation: int | None = None, quality: int = 90):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path


def count_decodes(monkeypatch, log):
    """Every decode of a file's pixels (ImageFile.load with tiles left) adds a line to `log`; worker
    processes fork from this one and inherit the patch."""
    original = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            with open(log, "a") as stream:
                stream.write(f"{self.size[0]}x{self.size[1]}\n")
        return original(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return lambda: open(log).read().split() if log.exists() else []


def test_a_jpeg_decodes_at_the_smallest_scale_still_at_least_the_side_asked():
    buffer = io.BytesIO()
    photo(1).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    assert load_rgb(data).size == (1600, 1200)
    assert load_rgb(data, at_least=224).size == (400, 300)  # 1/4: 1/8 would be 150 px, under 224
    assert load_rgb(data, at_least=150).size == (200, 150)  # 1/8
    assert load_rgb(data, at_least=1200).size == (1600, 1200)
    png = io.BytesIO()
    photo(1, (400, 300)).save(png, "PNG")
    assert load_rgb(png.getvalue(), at_least=64).size == (400, 300)  # other formats decode whole


def test_the_reduced_decode_gives_the_model_nearly_the_same_pixels(tmp_path):
    """What the model sees from a reduced decode, against a full one (both resized to 224 px)."""
    path = jpeg(tmp_path / "a.jpg", photo(2, (4000, 3000)))
    reduced = load_for_model(path, 224).astype(np.int16)
    full = np.asarray(resize_center_crop(load_rgb(path), 224), dtype=np.int16)
    difference = np.abs(reduced - full)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12


def test_scan_records_the_full_oriented_size_and_still_finds_a_truncated_photo(tmp_path):
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    jpeg(folder / "turned.jpg", photo(3), orientation=6)  # stored 1600x1200, shown 1200x1600
    whole = io.BytesIO()
    photo(4).save(whole, "JPEG", quality=90)
    (folder / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    records = {r["path"].rsplit("/", 1)[-1]: r for r in iter_records(scan(tmp_path / "data", out=tmp_path / "out",
                                                                           min_classes=1).records_path)}
    assert (records["turned.jpg"]["width"], records["turned.jpg"]["height"]) == (1200, 1600)
    assert records["turned.jpg"]["status"] == "ok" and records["turned.jpg"]["phash"]
    assert records["cut.jpg"]["status"] == "rejected" and records["cut.jpg"]["reason"] == "truncated or corrupt"


def test_the_scan_fills_the_cache_with_what_the_cache_would_have_decoded(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    paths = [jpeg(folder / f"{i}.jpg", photo(10 + i), orientation=6 if i == 0 else None) for i in range(3)]
    photo(20, (100, 80)).save(folder / "small.png")  # under from_side: left to the cache pass
    decodes = count_decodes(monkeypatch, tmp_path / "decodes.log")
    cache = ImageCache(tmp_path / "cache", 224)
    result = scan(tmp_path / "data", out=tmp_path / "out", min_classes=1, workers=2, cache=cache, cache_from_side=224)
    assert len(decodes()) == 4  # one per file
    records = {r["path"]: r for r in iter_records(result.records_path)}
    for path in paths:
        assert np.array_equal(cache.get(records[str(path)]["sha1"]), load_for_model(path, 224))
    del records[str(folder / "small.png")]
    decoded = len(decodes())
    rows = list(records.values())
    reopened = ImageCache(tmp_path / "cache", 224)
    keys = reopened.build([r["path"] for r in rows], [r["sha1"] for r in rows], workers=1)
    assert keys == [r["sha1"] for r in rows] and len(decodes()) == decoded  # nothing decoded again


def test_check_and_resize_leaves_small_and_bad_images_uncached(tmp_path):
    photo(5, (300, 200)).save(tmp_path / "small.jpg", "JPEG")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    config = DataConfig()
    small, pixels = check_and_resize((str(tmp_path / "small.jpg"), "a", None), max_pixels=config.max_pixels,
                                     min_side=config.min_side, size=224, from_side=224)
    assert small["status"] == "ok" and pixels is None
    small, pixels = check_and_resize((str(tmp_path / "small.jpg"), "a", None), max_pixels=config.max_pixels,
                                     min_side=config.min_side, size=96, from_side=0)
    assert pixels.shape == (96, 96, 3) and np.array_equal(pixels, load_for_model(tmp_path / "small.jpg", 96))
    bad, pixels = check_and_resize((str(tmp_path / "bad.jpg"), "a", None), max_pixels=config.max_pixels,
                                   min_side=config.min_side, size=96)
    assert bad["status"] == "rejected" and pixels is None


def test_a_cache_entry_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="uint8 \\(32, 32, 3\\)"):
        with ImageCache(tmp_path, 32).writer() as writer:
            writer.add("x.png", "abc", np.zeros((16, 16, 3), np.uint8))


def test_whole_decoding_stays_available_for_comparison(tmp_path, monkeypatch):
    path = jpeg(tmp_path / "a.jpg", photo(6))
    monkeypatch.setattr(images, "DECODE_MARGIN", None)  # what benchmarks/photo_ingest.py measures as "before"
    assert images.decode_side(224) is None
    assert np.array_equal(load_for_model(path, 224), np.asarray(resize_center_crop(load_rgb(path), 224)))


def test_a_training_run_decodes_each_photo_once_and_evaluate_audit_report_after_it_none(tmp_path, monkeypatch):
    """Photos at least the backbone's native size: the scan's decode fills the cache at the size the
    run then picks; caching, the phases, the pass after them and the report read the cache."""
    from effitune.pipeline import train

    for label in ("a", "b", "c"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(8):
            jpeg(tmp_path / "data" / label / f"{i}.jpg", photo(100 * ord(label) + i, (320, 240)))
    decodes = count_decodes(monkeypatch, tmp_path / "decodes.log")
    result = train(tmp_path / "data", out=tmp_path / "run", cache_root=tmp_path / "cache", progress=False,
                   config={"train.unfreeze": "1", "train.stage1.epochs": 1, "train.stage2.epochs": 1,
                           "train.accelerator": "cpu", "data.workers": 2})
    assert result.report is not None and (result.bundle / "weights.safetensors").is_file()
    assert result.timings and "scan" in result.timings
    from effitune.config import load_config

    assert load_config(result.run_dir / "config.yaml").data.image_size == 224  # the size the scan cached at
    assert len(decodes()) == 24  # one per photo: the scan's

    # after the run: evaluate, audit --model and report on its own images read the cache as well
    from effitune.evaluate.data_audit import audit_data
    from effitune.evaluate.evaluate import evaluate_bundle
    from effitune.evaluate.report import write_report
    from effitune.predict import Predictor, embed
    from effitune.runtime.batching import softmax

    manifest, bundle = result.run_dir / "manifest.csv", result.bundle
    assert evaluate_bundle(bundle, manifest, cache=tmp_path / "cache")["accuracy"] == pytest.approx(
        result.metrics["accuracy"])
    audit_data(bundle, manifest, cache=tmp_path / "cache")
    write_report(bundle, manifest, out=tmp_path / "report-again", cache=tmp_path / "cache")
    assert len(decodes()) == 24

    # predict decodes a new photo as training did: the same answers as from the cache entries
    from effitune.data.manifest import read_manifest

    test_rows = [row for row in read_manifest(manifest) if row["split"] == "test"]
    predictor = Predictor(bundle)
    inside = softmax(embed(predictor, test_rows, cache=tmp_path / "cache").logits, predictor.temperature)
    assert len(decodes()) == 24
    answers = predictor.predict([row["path"] for row in test_rows], reject=False)
    assert len(decodes()) == 24 + len(test_rows)  # predict reads the files, once each
    assert [answer["label"] for answer in answers] == [predictor.classes[i] for i in inside.argmax(1)]
    assert [answer["probability"] for answer in answers] == pytest.approx(inside.max(1).tolist(), abs=1e-4)
