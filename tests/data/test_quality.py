"""Image-quality checks: measured by the scan, judged against the data set by the audit, no model."""
import io
import json

import numpy as np
import pytest
from conftest import make_colour_dataset
from PIL import Image, ImageFilter
from rich.console import Console

from effitune.data import quality
from effitune.data.audit import audit
from effitune.data.quality import find_quality_issues
from effitune.data.scan import load_ok_records, scan


def scan_audit(root, out):
    return audit(scan(root, out=out, workers=1, progress=False))


def flagged(report) -> dict[str, set[str]]:
    """{kind: file names} of the report's quality findings."""
    found: dict[str, set[str]] = {}
    for issue in report.quality_issues:
        found.setdefault(issue.kind, set()).add(issue.path.rsplit("/", 1)[-1])
    return found


def rendered(report) -> str:
    console = Console(file=io.StringIO(), width=220)
    console.print(report.render())
    return console.file.getvalue()


def plant(root, name, change):
    """A changed copy of red_000.png, beside it."""
    with Image.open(root / "red" / "red_000.png") as image:
        change(image.convert("RGB")).save(root / "red" / name)


def darker(factor):
    return lambda image: Image.fromarray((np.asarray(image, np.float32) * factor).astype(np.uint8))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """150 colour images (50 a class); a blurred, a darkened, a grey, a large and an elongated one among them."""
    root = make_colour_dataset(tmp_path_factory.mktemp("quality") / "data", per_class=quality.OWN_CLASS_MIN)
    plant(root, "blurred.png", lambda image: image.filter(ImageFilter.GaussianBlur(2)))
    plant(root, "darkened.png", darker(0.3))
    plant(root, "grey.png", lambda image: image.convert("L"))
    plant(root, "large.png", lambda image: image.resize((image.width * 3, image.height * 3)))
    plant(root, "elongated.png", lambda image: image.resize((image.width * 3, image.height // 2)))
    return root, scan_audit(root, root.parent / "out")


def test_each_planted_defect_is_flagged_with_its_kind(planted):
    _, report = planted
    found = flagged(report)
    assert "blurred.png" in found["blurry"] and "darkened.png" in found["dark"]
    assert found["grayscale"] == {"grey.png"}
    assert found["odd_size"] == {"large.png"} and found["odd_aspect_ratio"] == {"elongated.png"}
    assert "darkened.png" not in found["blurry"]  # its edges are weak because it is dark: dark alone
    clean = set().union(*found.values()) - {"blurred.png", "darkened.png", "grey.png", "large.png", "elongated.png"}
    assert not clean  # nothing among the 150 ordinary images


def test_findings_in_json_rows_and_the_table(planted):
    _, report = planted
    values = json.loads(json.dumps(report.to_dict()))
    assert values["quality_counts"]["dark"] >= 1 and values["quality_counts"]["grayscale"] == 1
    row = next(r for r in values["quality_issues"] if r["path"].endswith("darkened.png"))
    assert row["kind"] == "dark" and row["label"] == "red" and row["value"] < row["fence"] < row["typical"]
    text = rendered(report)
    assert "Image quality:" in text and "darkened.png" in text and "grayscale" in text
    assert any("stand out from the rest" in w for w in report.warnings)


def test_an_all_dark_data_set_flags_nothing_as_dark(tmp_path):
    root = make_colour_dataset(tmp_path / "data", per_class=20)
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            darker(0.15)(image.convert("RGB")).save(path)
    assert "dark" not in flagged(scan_audit(root, tmp_path / "out"))


def test_grayscale_is_flagged_only_among_colour(tmp_path):
    root = make_colour_dataset(tmp_path / "data", per_class=20)
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            image.convert("L").save(path)
    assert "grayscale" not in flagged(scan_audit(root, tmp_path / "out"))


def record(index, label="a", width=40, height=40, **stats):
    values = {"brightness_p05": 0.1, "brightness_p99": 0.9, "blurriness": 80.0, "entropy": 6.0, "channel_spread": 30.0}
    return {"path": f"/d/{label}/{index}.png", "label": label, "split": None, "width": width, "height": height,
            "quality": {**values, **stats}}


def test_alike_values_need_the_gap_not_any_difference():
    """IQR 0: an image a little off is no outlier; one far off is."""
    records = [record(i) for i in range(30)]
    records += [record(30, brightness_p99=0.8, width=50, height=50), record(31, brightness_p99=0.3, width=100, height=100)]
    found = {(issue.kind, issue.path) for issue in find_quality_issues(records).issues}
    assert found == {("dark", "/d/a/31.png"), ("odd_size", "/d/a/31.png")}


def test_classes_are_judged_on_their_own_when_large_enough():
    """A class of dark images beside a bright one: nothing dark, as each is its own reference."""
    night = [record(i, "night", brightness_p99=0.2 + 0.001 * i) for i in range(quality.OWN_CLASS_MIN)]
    day = [record(i, "day", brightness_p99=0.9 - 0.001 * i) for i in range(quality.OWN_CLASS_MIN)]
    assert not find_quality_issues(night + day).issues
    pooled = [record(i, f"c{i}", brightness_p99=0.9) for i in range(20)] + [record(20, "x", brightness_p99=0.2)]
    assert [issue.path for issue in find_quality_issues(pooled).issues] == ["/d/x/20.png"]


def test_records_of_an_older_scan_are_skipped_and_said(tmp_path):
    root = make_colour_dataset(tmp_path / "data", per_class=4)
    records = load_ok_records(scan(root, out=tmp_path / "out", workers=1, progress=False).records_path)
    assert all(set(r["quality"]) == {"brightness_p05", "brightness_p99", "blurriness", "entropy", "channel_spread"}
               for r in records)
    old = [{k: v for k, v in r.items() if k != "quality"} for r in records]
    report = audit(old)
    assert report.quality_measured == 0 and any("scan the data again" in w for w in report.warnings)


def test_measure_does_not_depend_on_the_decoded_scale():
    """The scan decodes at different scales (cache size, reduced JPEG): the numbers are taken at 64 px."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((256, 256), Image.Resampling.BICUBIC)
    small, large = quality.measure(base.resize((128, 128))), quality.measure(base)
    assert small["blurriness"] == pytest.approx(large["blurriness"], rel=0.1)
    assert small["brightness_p99"] == pytest.approx(large["brightness_p99"], abs=0.02)


def test_overexposed_and_low_information_images():
    spread = [record(i, brightness_p05=0.05 + 0.002 * i, entropy=6.0 + 0.01 * i) for i in range(40)]
    washed_out, blank = record(40, brightness_p05=0.8), record(41, entropy=1.5)
    found = {(issue.kind, issue.path) for issue in find_quality_issues(spread + [washed_out, blank]).issues}
    assert found == {("light", washed_out["path"]), ("low_information", blank["path"])}
