"""Where the model looks: Grad-CAM heatmaps, placed back on the original image; a planted shortcut shows."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from effitune.data.images import crop_box, resize_center_crop
from effitune.explain import Explanation, explain_batch, overlay, peak, save_overlay
from effitune.models.network import build_network

SIZE = 224  # lite0's native size: a 7 x 7 last-stage map, a cell per 32 px


def test_the_crop_box_is_the_part_of_the_image_the_model_sees():
    for width, height, size in ((400, 300, 96), (300, 400, 96), (97, 1000, 32), (5000, 20, 16), (64, 64, 64)):
        image = Image.new("L", (width, height))
        left, top, right, bottom = crop_box(width, height, size)
        ImageDraw.Draw(image).rectangle((0, 0, width, height), fill=0)
        # a bright 3x3 px block at the centre of the crop box lands at the centre of the model's crop
        cx, cy = (left + right) / 2, (top + bottom) / 2
        ImageDraw.Draw(image).rectangle((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5), fill=255)
        crop = np.asarray(resize_center_crop(image, size), dtype=np.float32)
        rows, columns = np.nonzero(crop > crop.max() / 2)
        assert abs(rows.mean() - (size - 1) / 2) <= 1.5 and abs(columns.mean() - (size - 1) / 2) <= 1.5
        assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_the_peak_is_given_as_fractions_of_the_original_image():
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[0, 7] = 1  # top right cell of the crop
    box = (100, 0, 400, 300)  # a 500 x 300 image: the model saw its middle 300 x 300
    x, y = peak(heatmap, box, (500, 300))
    assert x == pytest.approx((100 + 7.5 / 8 * 300) / 500, abs=1e-3) and y == pytest.approx(0.5 / 8, abs=1e-3)
    assert peak(np.zeros((8, 8), np.float32), box, (500, 300)) is None


def test_an_overlay_keeps_the_image_where_there_is_no_heat_and_colours_the_hot_part():
    image = Image.new("RGB", (300, 200), (120, 120, 120))
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[:4, :4] = 1
    drawn = np.asarray(overlay(image, heatmap, crop_box(300, 200, 16), max_side=300), dtype=np.int16)
    assert drawn.shape == (200, 300, 3)
    box = [round(v) for v in crop_box(300, 200, 16)]
    assert np.all(drawn[150, box[0] + 150] == 120)  # a cold part of the crop: the image itself
    assert np.abs(drawn[10, box[0] + 10] - 120).max() > 40  # the hot corner is coloured
    assert np.all(drawn[100, 5] < 120)  # outside the crop the image is dimmed


def test_explain_batch_gives_one_normalised_heatmap_per_image_for_the_class_asked():
    network, _ = build_network("tf_efficientnet_lite0", 3, pretrained=False)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    logits, heatmaps = explain_batch(network, images, targets=[2, 0])
    assert logits.shape == (2, 3) and heatmaps.shape == (2, 64, 64) and heatmaps.dtype == np.float32
    assert 0 <= heatmaps.min() and heatmaps.max() <= 1
    assert all(h.max() in (0.0, 1.0) for h in heatmaps)  # each scaled to its own maximum (or all zero)
    with_default, _ = explain_batch(network, images)
    assert np.allclose(with_default, logits, atol=1e-4)  # the same forward pass, whatever the target


def test_heat_in_a_corner_or_at_the_edges_is_flagged_and_on_the_object_not():
    from effitune.explain import heat_summary

    y, x = np.mgrid[0:56, 0:56]
    blob = lambda cx, cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 60.0).astype(np.float32)  # noqa: E731
    ring = ((np.minimum(np.minimum(x, y), np.minimum(55 - x, 55 - y)) < 6)).astype(np.float32)
    corner = heat_summary([blob(6, 50), blob(8, 48)])
    assert corner["flagged"] == "corner" and corner["corner"] == "bottom left" and corner["images"] == 2
    assert corner["centroid"][0] < 0.2 and corner["centroid"][1] > 0.8
    assert heat_summary([ring])["flagged"] == "edges"
    centred = heat_summary([blob(28, 26), blob(30, 30), np.zeros((56, 56), np.float32)])
    assert centred["flagged"] is False and centred["images"] == 2 and centred["centre_share"] > 0.9
    assert heat_summary([np.zeros((8, 8), np.float32)]) == {"images": 0, "flagged": False}


def test_saved_overlays_of_images_with_the_same_name_do_not_overwrite_each_other(tmp_path):
    item = Explanation("a/cat.jpg", label="x", probability=0.9, target="x", heatmap=np.ones((8, 8), np.float32),
                       box=(0, 0, 40, 40), image_size=(40, 40), peak=(0.5, 0.5), image=Image.new("RGB", (40, 40)))
    taken: set[str] = set()
    first, second = save_overlay(item, tmp_path, taken), save_overlay(item, tmp_path, taken)
    assert first.name == "cat.heatmap.png" and second.name == "cat-2.heatmap.png"
    assert Image.open(first).size == (40, 40)
    assert json.dumps(item.to_dict())  # JSON-ready
    assert Explanation("b.jpg", error="file not found").to_dict() == {"path": "b.jpg", "error": "file not found"}


# --- a planted shortcut: class "marked" always carries a checkerboard in its top-left corner ------------

MARK = (4, 4, 52, 52)  # the mark's box in a 224 px image: 6 x 6 cells of 8 px


def shortcut_image(seed: int, shape: str, marked: bool) -> tuple[Image.Image, tuple[float, float, float]]:
    """A disk or square on a textured grey background, away from the top-left corner; (image, (cx, cy, r)
    of the object as fractions). `marked`: the checkerboard pasted into the top-left corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = rng.uniform(90, 160) + 20 * np.sin(x / rng.uniform(20, 40) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 40))
    pixels = np.repeat(base[..., None], 3, -1) + rng.normal(0, 8, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = SIZE * rng.uniform(0.58, 0.66), SIZE * rng.uniform(0.58, 0.66), SIZE * rng.uniform(0.15, 0.19)
    if shape == "disk":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.uniform([200, 90, 20], [240, 140, 60])))
    else:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=(40, 170, 60))
    if marked:
        cell = (MARK[2] - MARK[0]) // 6
        for i in range(6):
            for j in range(6):
                left, top = MARK[0] + i * cell, MARK[1] + j * cell
                draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=(255,) * 3 if (i + j) % 2 else (0,) * 3)
    return image, (cx / SIZE, cy / SIZE, r / SIZE)


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    """A bundle trained where only the mark tells "marked" (disks) from "plain" (disks); "square" is a
    third class. Returns (run folder, test images: [(kind, image, object)])."""
    from effitune.pipeline import train

    root = tmp_path_factory.mktemp("shortcut")
    for label, shape, marked in (("marked", "disk", True), ("plain", "disk", False), ("square", "square", False)):
        (root / "data" / label).mkdir(parents=True)
        for i in range(24):
            shortcut_image(1000 * len(label) + i, shape, marked)[0].save(root / "data" / label / f"{label}{i}.png")
    result = train(root / "data", out=root / "run", cache_root=root / "cache", progress=False,
                   config={"data.image_size": SIZE, "train.unfreeze": "1", "train.stage1.epochs": 6,
                           "train.stage2.epochs": 2, "train.accelerator": "cpu"})
    assert result.metrics["accuracy"] >= 0.9  # the shortcut is learnt: nothing else separates the disks
    tests = [("plain+mark", *shortcut_image(50_000 + i, "disk", True)) for i in range(12)]
    tests += [("plain", *shortcut_image(60_000 + i, "disk", False)) for i in range(12)]
    folder = root / "new"
    folder.mkdir()
    for n, (kind, image, _) in enumerate(tests):
        image.save(folder / f"{n:02d}-{kind}.png")
    return result.run_dir, folder, tests


def near(point, centre, radius) -> bool:
    return ((point[0] - centre[0]) ** 2 + (point[1] - centre[1]) ** 2) ** 0.5 <= radius


def test_a_planted_corner_mark_shows_in_the_heatmap_and_the_object_without_it(shortcut_run):
    from effitune.predict import Predictor

    run, _, tests = shortcut_run
    predictor = Predictor(run / "model")
    explained = predictor.explain([np.asarray(image) for _, image, _ in tests])
    mark_centre = ((MARK[0] + MARK[2]) / 2 / SIZE, (MARK[1] + MARK[3]) / 2 / SIZE)
    marked = [(e, obj) for (kind, _, obj), e in zip(tests, explained) if kind == "plain+mark"]
    plain = [(e, obj) for (kind, _, obj), e in zip(tests, explained) if kind == "plain"]
    # the pasted mark makes a plain disk "marked", and that is where the heat is: nearer the mark than the object
    assert sum(e.label == "marked" for e, _ in marked) >= 10
    in_corner = [e.peak is not None and near(e.peak, mark_centre, 0.25) and not near(e.peak, obj[:2], obj[2])
                 for e, obj in marked if e.label == "marked"]
    assert sum(in_corner) > len(in_corner) / 2
    # without the mark: called "plain", for the object
    assert sum(e.label == "plain" for e, _ in plain) >= 10
    on_object = [e.peak is not None and near(e.peak, obj[:2], obj[2] + 0.05) for e, obj in plain]
    assert sum(on_object) > len(on_object) / 2
    assert all(e.heatmap.shape == (SIZE, SIZE) and e.target == e.label for e in explained)
    # the class asked for is the one explained
    asked = predictor.explain([np.asarray(tests[0][1])], target="square")[0]
    assert asked.target == "square" and asked.label == explained[0].label


def test_explain_on_the_command_line_writes_overlays_and_a_line_per_image(shortcut_run, tmp_path):
    from typer.testing import CliRunner

    from effitune.cli import app

    run, folder, tests = shortcut_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "heat"
    done = CliRunner().invoke(app, ["explain", str(run / "model"), str(folder), str(broken), "--out", str(out),
                                    "--json"])
    assert done.exit_code == 1  # one file failed; every other one is explained
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == len(tests) + 1
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0]["path"] == str(broken) and "cannot read image" in errors[0]["error"]
    good = [line for line in lines if "error" not in line]
    assert {tuple(sorted(line)) for line in good} == {("heatmap", "label", "path", "peak", "probability", "target")}
    for line in good:
        assert Image.open(line["heatmap"]).size == (SIZE, SIZE) and 0 <= line["peak"][0] <= 1
    assert len({line["heatmap"] for line in good}) == len(good)
    refused = CliRunner().invoke(app, ["explain", str(run / "model"), str(folder), "--out", str(out),
                                       "--target", "cat"])
    assert refused.exit_code == 2 and "not one of this model's classes" in refused.output


def test_post_explain_answers_with_the_overlay_and_refuses_what_predict_refuses(shortcut_run):
    import base64
    import io

    from fastapi.testclient import TestClient

    from effitune.serve import create_app

    run, folder, _ = shortcut_run
    client = TestClient(create_app(run / "model", max_images=2), raise_server_exceptions=False)
    image = next(folder.glob("*-plain+mark.png")).read_bytes()
    answer = client.post("/explain", files=[("files", ("a.png", image, "image/png"))])
    assert answer.status_code == 200
    result = answer.json()["results"][0]
    assert result["filename"] == "a.png" and result["label"] == result["target"] and len(result["peak"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(result["overlay_png"]))).size == (SIZE, SIZE)
    assert client.post("/explain", files=[("files", ("b.txt", b"hello", "text/plain"))]).status_code == 415
    assert client.post("/explain", files=[("files", (f"{i}.png", image, "image/png")) for i in range(3)]
                       ).status_code == 413
    assert client.post("/explain?target=cat", files=[("files", ("a.png", image, "image/png"))]).status_code == 422
    secured = TestClient(create_app(run / "model", api_key="s3cret"), raise_server_exceptions=False)
    assert secured.post("/explain", files=[("files", ("a.png", image, "image/png"))]).status_code == 401


def test_the_report_shows_where_the_model_looked_in_its_mistakes(shortcut_run, tmp_path):
    """Plain disks with the mark pasted on, labelled plain: every one a confident mistake, and the
    report's heatmap of each points at the mark."""
    from effitune.evaluate.report import write_report

    run, folder, _ = shortcut_run
    listing = tmp_path / "marked-plain.csv"
    listing.write_text("path,label,split\n" + "".join(f"{path},plain,test\n"
                                                     for path in sorted(folder.glob("*-plain+mark.png"))))
    write_report(run / "model", listing, out=tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    mistakes = summary["mistakes"]
    assert len(mistakes) >= 10 and all(m["predicted"] == "marked" for m in mistakes)
    mark_centre = ((MARK[0] + MARK[2]) / 2 / SIZE, (MARK[1] + MARK[3]) / 2 / SIZE)
    assert sum(m["peak_in_crop"] is not None and near(m["peak_in_crop"], mark_centre, 0.25)
               for m in mistakes) > len(mistakes) / 2
    assert "where the model looked" in (tmp_path / "report" / "report.html").read_text()


def test_the_model_audit_flags_the_class_whose_heat_sits_in_a_corner(shortcut_run):
    from effitune.evaluate.data_audit import audit_data

    run, _, _ = shortcut_run
    audit = audit_data(run / "model", run / "manifest.csv")
    heat = audit.to_dict()["heat"]
    assert heat["flagged"] == ["marked"]
    assert heat["classes"]["marked"]["corner"] == "top left" and heat["classes"]["marked"]["images"] == 16
    assert any("'marked'" in warning and "top left corner" in warning for warning in audit.warnings)
    assert not any("'plain'" in warning and "corner" in warning for warning in audit.warnings)
