import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_tree, random_image
from PIL import Image
from rich.console import Console

from effitune.config import DataConfig
from effitune.data import scan as scan_module
from effitune.data.scan import iter_records, load_ok_records, scan
from effitune.data.images import load_rgb
from effitune.errors import UserError


RECORD_FIELDS = ["path", "label", "split", "status", "reason", "detail", "width", "height", "mode", "format",
                 "orientation", "frames", "bytes", "sha1", "phash", "dhash", "mean_rgb", "quality", "notes"]
BAD_NAME = b"\xff\xfe odd.png"  # not valid UTF-8


def snapshot(root: Path) -> dict:
    """Every entry under root with its size and mtime: proof that the scan wrote nothing there."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            info = os.lstat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return found


def write_messy_tree(base: Path) -> Path:
    """Two good classes plus one of every kind of odd or broken file effitune must handle."""
    root = base / "data"
    make_image_tree(root, {"cat": 4, "dog": 4})
    cat, dog = root / "cat", root / "dog"
    (root / "empty_class").mkdir()
    (root / "README.md").write_text("not a class")
    (root / ".hidden_dir").mkdir()
    random_image(90).save(root / ".hidden_dir" / "x.png")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "notes.txt").write_text("a note")
    # rejections
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("this is not an image\n")
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    full = io.BytesIO()
    Image.fromarray(noise).save(full, "JPEG", quality=90)
    (cat / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    Image.new("RGB", (300, 300)).save(cat / "bomb.png")  # over max_pixels, under Pillow's 2x hard stop
    Image.new("RGB", (400, 400)).save(cat / "huge.png")  # over 2x max_pixels: Pillow's own error
    Image.new("RGB", (10, 40), (9, 9, 9)).save(cat / "tiny.png")
    os.symlink(cat / "gone_target.png", cat / "gone.jpg")  # broken link
    os.symlink("self_loop.jpg", cat / "self_loop.jpg")  # ELOOP: exists, cannot be opened
    # odd but valid
    random_image(91).save(dog / "png_named.jpg", "PNG")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(dog / "cmyk.jpg", quality=95)
    random_image(92).convert("L").save(dog / "grey.png")
    random_image(93).convert("LA").save(dog / "grey_alpha.png")
    palette = random_image(94).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(dog / "palette.png", transparency=0)
    rgba = np.zeros((32, 40, 4), dtype=np.uint8)
    rgba[:, 20:, 3] = 255  # left half transparent black, right half opaque black
    Image.fromarray(rgba, "RGBA").save(dog / "rgba.png")
    Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (32, 1))).save(dog / "deep16.png")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(dog / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    upright = np.zeros((24, 40, 3), dtype=np.uint8)
    upright[:12] = (255, 0, 0)  # stored top half red, bottom half blue
    upright[12:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(upright).save(dog / "rotated.jpg", quality=95, exif=exif)
    with open(os.path.join(os.fsencode(dog), BAD_NAME), "wb") as stream:
        random_image(95).save(stream, "PNG")
    # links: loops are skipped, a link to a folder elsewhere is followed
    os.symlink(root, cat / "loop")
    os.symlink(cat, dog / "again")
    outside = base / "outside"
    outside.mkdir()
    random_image(96).save(outside / "linked.png")
    os.symlink(outside, dog / "linked")
    return root


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    base = tmp_path_factory.mktemp("messy")
    root = write_messy_tree(base)
    before = snapshot(root)
    result = scan(root, out=base / "out", config=DataConfig(max_pixels=60_000), workers=2, progress=False)
    records = {os.path.basename(r["path"]): r for r in iter_records(result.records_path)}
    return result, records, before, root


@pytest.mark.parametrize("name, reason", [
    ("empty.jpg", "empty file"), ("text.jpg", "not an image"), ("truncated.jpg", "truncated or corrupt"),
    ("bomb.png", "decompression bomb"), ("huge.png", "decompression bomb"), ("tiny.png", "too small"),
    ("gone.jpg", "missing file"), ("self_loop.jpg", "unreadable"),
])
def test_each_bad_file_is_rejected_with_its_reason(messy, name, reason):
    record = messy[1][name]
    assert (record["status"], record["reason"]) == ("rejected", reason)
    assert record["detail"]


def test_rejection_details(messy):
    records = messy[1]
    assert records["empty.jpg"]["bytes"] == 0
    assert "300x300" in records["bomb.png"]["detail"] or "90000" in records["bomb.png"]["detail"]
    assert (records["tiny.png"]["width"], records["tiny.png"]["height"]) == (10, 40)
    assert records["truncated.jpg"]["sha1"] and records["truncated.jpg"]["format"] == "JPEG"


def test_permission_denied_is_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    random_image(1).save(path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the error the OS would raise
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(scan_module, "open", denied, raising=False)
    record = scan_module.check_file((str(path), "a", None), max_pixels=10**6, min_side=16)
    assert (record["reason"], record["detail"]) == ("unreadable", "cannot read the file: Permission denied")


@pytest.mark.parametrize("name, mode, note", [
    ("png_named.jpg", "RGB", "extension .jpg but content PNG"),
    ("cmyk.jpg", "CMYK", "mode CMYK converted to RGB"),
    ("grey.png", "L", "mode L converted to RGB"),
    ("grey_alpha.png", "LA", "mode LA converted to RGB (transparency over white)"),
    ("palette.png", "P", "mode P converted to RGB (transparency over white)"),
    ("rgba.png", "RGBA", "mode RGBA converted to RGB (transparency over white)"),
    ("animated.gif", "P", "animated: first frame kept (3 frames)"),
    ("rotated.jpg", "RGB", "EXIF orientation 6 applied"),
])
def test_odd_but_valid_files_are_kept_with_a_note(messy, name, mode, note):
    record = messy[1][name]
    assert record["status"] == "ok", record["detail"]
    assert record["mode"] == mode
    assert note in record["notes"]


def test_pixels_after_conversion(messy):
    records = messy[1]
    assert records["cmyk.jpg"]["mean_rgb"] == pytest.approx([255, 0, 0], abs=8)
    # Left half fully transparent -> white; right half opaque black.
    assert records["rgba.png"]["mean_rgb"] == pytest.approx([127.5] * 3, abs=0.01)
    assert load_rgb(records["rgba.png"]["path"]).getpixel((0, 0)) == (255, 255, 255)
    deep = records["deep16.png"]
    assert deep["status"] == "ok" and deep["mode"] in ("I;16", "I")
    assert deep["mean_rgb"][0] == pytest.approx(127.5, abs=2)  # the 16-bit range stretched, not clipped
    gif = records["animated.gif"]
    assert gif["frames"] == 3 and gif["mean_rgb"] == pytest.approx([255, 0, 0], abs=1)


def test_exif_orientation_swaps_size_and_rotates_pixels(messy):
    record = messy[1]["rotated.jpg"]
    assert (record["orientation"], record["width"], record["height"]) == (6, 24, 40)
    image = load_rgb(record["path"])
    left, right = image.getpixel((2, 20)), image.getpixel((21, 20))
    assert left[2] > 200 and left[0] < 60  # the stored bottom (blue) is now on the left
    assert right[0] > 200 and right[2] < 60


def test_non_utf8_file_name_round_trips(messy):
    result, records = messy[0], messy[1]
    record = next(r for r in records.values() if "\udcff" in r["path"])
    assert record["status"] == "ok"
    assert os.fsencode(record["path"]).endswith(BAD_NAME)
    raw = Path(result.records_path).read_bytes()
    assert raw.isascii() and b"\\udcff\\udcfe odd.png" in raw
    assert load_rgb(record["path"]).size == (40, 32)  # the stored path opens the same file


def test_skips_links_and_counts(messy):
    result, records, _, root = messy
    assert result.counts["skipped_hidden"] == 2  # .hidden_dir (not entered) and .DS_Store
    assert result.counts["skipped_non_image"] == 1  # notes.txt
    assert result.counts["skipped_unlabelled"] == 1  # README.md next to the class folders
    assert result.counts["skipped_repeated_dirs"] == 2  # cat/loop -> data, dog/again -> cat
    assert records["linked.png"]["label"] == "dog"  # a linked folder elsewhere is followed
    assert "x.png" not in records  # hidden folder not entered
    # Each real file once, even though links make cat/ reachable three ways.
    assert sum(r["label"] == "cat" and r["status"] == "ok" for r in records.values()) == 4


def test_summary_counts_and_streamed_records(messy):
    result, records, _, _ = messy
    lines = Path(result.records_path).read_text().splitlines()
    assert len(lines) == result.counts["ok"] + result.counts["rejected"] == len(records)
    assert all(list(json.loads(line)) == RECORD_FIELDS for line in lines)
    assert result.counts["rejected"] == 8 and sum(result.reasons.values()) == 8
    assert result.reasons["decompression bomb"] == 2
    assert result.per_class == {"cat": 4, "dog": 4 + 11, "empty_class": 0}
    assert result.empty_classes == ["empty_class"]
    assert result.rejected_per_class == {"cat": 8}
    assert result.extension_mismatches == 1 and result.notes["EXIF orientation applied"] == 1
    assert result.formats["GIF"] == 1 and result.layout == "classes" and result.splits == {}
    assert len(load_ok_records(result.records_path)) == result.counts["ok"]
    assert not list(Path(result.records_path).parent.glob("*.partial"))


def test_data_folder_is_left_untouched(messy):
    assert snapshot(messy[3]) == messy[2]


def test_summary_table_and_json(messy):
    result = messy[0]
    console = Console(file=io.StringIO(), width=120)
    console.print(result.summary_table())
    text = console.file.getvalue()
    assert "empty_class" in text and "8 " in text and "decompression bomb" in text
    assert json.loads(json.dumps(result.to_dict()))["empty_classes"] == ["empty_class"]


def test_in_process_scan_matches_pool(messy, tmp_path):
    result, records, _, root = messy
    again = scan(root, out=tmp_path, config=DataConfig(max_pixels=60_000), workers=1)  # progress on, no TTY
    assert again.counts == result.counts
    assert {os.path.basename(r["path"]): r for r in iter_records(again.records_path)} == records


def test_csv_input_with_relative_and_absolute_paths(tmp_path):
    written = make_image_tree(tmp_path / "images", {"cat": 3, "dog": 3})
    rows = ["path,label"] + [f"images/cat/{p.name},cat" for p in written["cat"]]
    rows += [f"{p},dog" for p in written["dog"]] + ["images/dog/nowhere.png,dog"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = scan(tmp_path / "labels.csv", out=tmp_path / "out", workers=1, progress=False)
    assert result.layout == "csv" and result.per_class == {"cat": 3, "dog": 3}
    assert result.reasons == {"missing file": 1}
    paths = {r["path"] for r in load_ok_records(result.records_path)}
    assert paths == {str(p) for group in written.values() for p in group}


def test_csv_rows_that_repeat_a_file_are_read_once_and_said(tmp_path):
    written = make_image_tree(tmp_path / "images", {"cat": 3, "dog": 3})
    rows = ["path,label"] + [f"{p},{label}" for label, group in written.items() for p in group]
    rows += [f"images/cat/{written['cat'][0].name},cat", f"{written['cat'][1]},dog"]  # same file, twice; other label
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result = scan(tmp_path / "labels.csv", out=tmp_path / "out", workers=1, progress=False)
    assert result.per_class == {"cat": 3, "dog": 3} and result.counts["skipped_repeated_rows"] == 2
    [notice] = [n for n in result.notices if "already listed" in n]
    assert "2 row(s) list a file already listed" in notice and "with label 'dog', kept as 'cat'" in notice


def test_csv_split_column(tmp_path):
    written = make_image_tree(tmp_path, {"a": 2, "b": 2})
    lines = ["Path,Label,Split"] + [f"{p},{label},{split}" for label, ps in written.items()
                                    for p, split in zip(ps, ("train", "Valid"))]
    (tmp_path / "l.csv").write_text("\n".join(lines))
    result = scan(tmp_path / "l.csv", out=tmp_path / "o", workers=1, progress=False)
    assert result.splits == {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}}


def test_existing_split_layout(tmp_path):
    for seed, split in enumerate(("train", "valid", "test")):
        make_image_tree(tmp_path / "data" / split, {"cat": 2, "dog": 3}, seed=seed)
    result = scan(tmp_path / "data", out=tmp_path / "out", workers=1, progress=False)
    assert result.layout == "splits"
    assert result.splits == {split: {"cat": 2, "dog": 3} for split in ("test", "train", "val")}
    assert {r["split"] for r in iter_records(result.records_path)} == {"train", "val", "test"}
    assert result.per_class == {"cat": 6, "dog": 9}


def test_classes_named_like_splits_are_classes_when_they_hold_images_directly(tmp_path):
    make_image_tree(tmp_path / "data", {"train": 2, "test": 3})  # photos of trains and of tests
    result = scan(tmp_path / "data", out=tmp_path / "out", workers=1, progress=False)
    assert result.layout == "classes" and result.per_class == {"test": 3, "train": 2}


def test_training_and_testing_folders_are_splits(tmp_path):
    for seed, split in enumerate(("training", "testing")):
        make_image_tree(tmp_path / "data" / split, {"cat": 2, "dog": 3}, seed=seed)
    result = scan(tmp_path / "data", out=tmp_path / "out", workers=1, progress=False)
    assert result.layout == "splits" and set(result.splits) == {"train", "test"}


def test_class_folders_holding_the_same_sub_folders_are_pointed_out(tmp_path):
    for seed, split in enumerate(("train", "holdout")):  # splits under a name effitune does not know
        make_image_tree(tmp_path / "data" / split, {"cat": 2, "dog": 3}, seed=seed)
    result = scan(tmp_path / "data", out=tmp_path / "out", workers=1, progress=False)
    assert result.layout == "classes" and set(result.per_class) == {"holdout", "train"}
    assert any("'holdout', 'train' hold sub-folders of the same names ('cat', 'dog')" in n for n in result.notices)
    plain = scan(tmp_path / "data" / "train", out=tmp_path / "out2", workers=1, progress=False)
    assert not plain.notices
    for animal in ("cat", "dog"):  # photos filed by year: a nested layout, not splits
        make_image_tree(tmp_path / "years" / animal / "2019", {"a": 1}, seed=3)
    nested = scan(tmp_path / "years", out=tmp_path / "out3", workers=1, progress=False)
    assert not [n for n in nested.notices if "sub-folders of the same names" in n]


def user_error(tmp_path, data, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        scan(data, out=kwargs.pop("out", tmp_path / "out"), workers=1, progress=False, **kwargs)
    return str(caught.value)


def test_user_errors_name_the_path(tmp_path):
    assert str(tmp_path / "nope") in user_error(tmp_path, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "is empty" in user_error(tmp_path, tmp_path / "empty")
    make_image_tree(tmp_path / "one", {"cat": 2})
    message = user_error(tmp_path, tmp_path / "one")
    assert str(tmp_path / "one") in message and "single class" in message
    flat = tmp_path / "flat"
    flat.mkdir()
    random_image(0).save(flat / "a.png")
    assert "no class folders" in user_error(tmp_path, flat)
    for label in ("a", "b"):
        (tmp_path / "docs" / label).mkdir(parents=True)
        (tmp_path / "docs" / label / "readme.txt").write_text("x")
    message = user_error(tmp_path, tmp_path / "docs")
    assert str(tmp_path / "docs") in message and "no images (2 other files" in message
    (tmp_path / "notes.txt").write_text("x")
    assert "not a CSV" in user_error(tmp_path, tmp_path / "notes.txt")


def test_user_errors_after_scanning(tmp_path, image_tree):
    message = user_error(tmp_path, image_tree, out=image_tree / "out")
    assert "inside the data folder" in message and not (image_tree / "out").exists()
    for path in (image_tree / "dog").iterdir():
        path.write_bytes(b"broken")
    message = user_error(tmp_path, image_tree)
    assert "only 'cat' has usable images" in message and str(image_tree) in message


def test_csv_user_errors(tmp_path):
    (tmp_path / "cols.csv").write_text("file,class\na.png,cat\n")
    message = user_error(tmp_path, tmp_path / "cols.csv")
    assert str(tmp_path / "cols.csv") in message and "found: file, class" in message
    (tmp_path / "gone.csv").write_text("path,label\nx.png,cat\ny.png,dog\n")
    message = user_error(tmp_path, tmp_path / "gone.csv")
    assert "None of the 2 files" in message and str(tmp_path) in message
    (tmp_path / "blank.csv").write_text("path,label\nx.png,\n")
    assert "line 2" in user_error(tmp_path, tmp_path / "blank.csv")


def test_walk_is_lazy(image_tree):
    walker = scan_module._Walker()
    tasks = walker.folder_tasks(image_tree, [(str(image_tree / "cat"), "cat", None)])
    assert next(tasks)[1] == "cat"  # a generator: files are produced while the pool works
    shutil.rmtree(image_tree / "dog")  # nothing about dog/ was read in advance
    assert sum(1 for _ in tasks) == 7


def check(path, **limits):
    return scan_module.check_file((str(path), "a", None), **{"max_pixels": 10**7, "min_side": 4, **limits})


def test_a_pipe_named_like_an_image_is_rejected_not_waited_on(tmp_path):
    import threading

    os.mkfifo(tmp_path / "p.jpg")
    found = []
    reader = threading.Thread(target=lambda: found.append(check(tmp_path / "p.jpg")), daemon=True)
    reader.start()
    reader.join(timeout=20)  # opening the pipe for reading would block forever (no writer)
    assert not reader.is_alive(), "the scan blocked on a pipe"
    assert found[0]["reason"] == "unreadable" and "not a regular file" in found[0]["detail"]


def test_phone_formats_pillow_cannot_read_are_rejected_with_the_way_out(tmp_path):
    (tmp_path / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    record = check(tmp_path / "IMG_1.HEIC")
    assert record["reason"] == "not an image" and "convert them to JPEG or PNG" in record["detail"]
    assert "pillow-heif" in record["detail"]


def test_colour_key_transparency_and_uniform_deep_images(tmp_path):
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    rgb[:] = (0, 255, 0)
    rgb[5:10, 5:10] = (200, 10, 10)
    Image.fromarray(rgb).save(tmp_path / "keyed.png", transparency=(0, 255, 0))
    record = check(tmp_path / "keyed.png")
    assert "mode RGB with a transparent colour key: converted to RGB (transparency over white)" in record["notes"]
    pixels = np.asarray(load_rgb(tmp_path / "keyed.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[6, 6]) == (200, 10, 10)
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8)).save(tmp_path / "grey_keyed.png", transparency=128)
    assert tuple(np.asarray(load_rgb(tmp_path / "grey_keyed.png"))[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    assert check(tmp_path / "white16.png")["mean_rgb"] == [255, 255, 255]  # not black: no range to stretch


def test_invalid_exif_orientation_is_said_to_be_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 9
    random_image(5).save(tmp_path / "odd.jpg", exif=exif)
    assert "invalid EXIF orientation 9 (valid: 1-8): ignored" in check(tmp_path / "odd.jpg")["notes"]


def test_rejections_and_notices_speak_in_the_users_terms(messy):
    result, records, _, _ = messy
    assert "160000 pixels is over max_pixels 60000" in records["huge.png"]["detail"]  # not Pillow's 2x threshold
    assert any("'empty_class' has no usable images" in notice and "left out" in notice for notice in result.notices)


def test_an_elongated_image_is_cropped_before_it_is_resized(monkeypatch):
    """Resizing a 16 x 40,000 strip whole first would make a 224 x 560,000 image (376 MB) for one crop."""
    from effitune.data.images import resize_center_crop

    requested = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        requested.append(size)
        return resize(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", recording)
    out = resize_center_crop(Image.new("RGB", (16, 40_000), (10, 20, 30)), 224)
    assert out.size == (224, 224) and out.getpixel((100, 100)) == (10, 20, 30)
    assert max(w * h for w, h in requested) <= 224 * 224


def test_class_names_that_differ_only_in_case_or_separators_are_pointed_out(tmp_path):
    make_image_tree(tmp_path / "data", {"Cat": 2, "cat": 2, "sea lion": 2, "sea_lion": 2, "dog": 2})
    result = scan(tmp_path / "data", out=tmp_path / "out", workers=1)
    look_alike = [notice for notice in result.notices if "differ only in case" in notice]
    assert len(look_alike) == 2 and "'Cat', 'cat'" in look_alike[0] and "'sea lion', 'sea_lion'" in look_alike[1]
    assert result.per_class == {"Cat": 2, "cat": 2, "dog": 2, "sea lion": 2, "sea_lion": 2}  # still all trained
