import csv
import io
import json
import shutil

import numpy as np
import pytest
from conftest import make_image_tree
from PIL import Image
from rich.console import Console

from effitune.config import DataConfig
from effitune.data import audit as audit_module
from effitune.data.audit import audit, duplicate_groups, near_duplicate_pairs
from effitune.data.scan import load_ok_records, scan
from effitune.errors import UserError


def scan_tree(root, out):
    return scan(root, out=out, workers=1, progress=False)


def near_copy(source, target):
    """The same picture re-encoded as JPEG: other bytes, nearly the same phash."""
    Image.open(source).convert("RGB").save(target, "JPEG", quality=85)


def rendered(report) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(report.render())
    return console.file.getvalue()


def test_statistics_of_a_clean_tree(tmp_path):
    make_image_tree(tmp_path / "data", {"cat": 12, "dog": 4}, size=(40, 32))
    make_image_tree(tmp_path / "data", {"tall": 3}, size=(20, 30), seed=1)
    report = audit(scan_tree(tmp_path / "data", tmp_path / "out"))
    assert report.class_counts == {"cat": 12, "dog": 4, "tall": 3}
    assert report.imbalance_ratio == 4.0
    assert report.resolution["tall"] == {"width": {"median": 20, "min": 20, "max": 20},
                                         "height": {"median": 30, "min": 30, "max": 30}}
    assert report.aspect_ratio["median"] == 1.25 and report.aspect_ratio["min"] == pytest.approx(0.667)
    assert report.orientation == {"landscape": 16, "portrait": 3}
    assert report.formats == {"PNG": 10, "JPEG": 9}
    assert not report.exact_duplicates and not report.near_duplicates  # the fixture's images are distinct
    assert any("imbalanced" in w for w in report.warnings)
    assert json.loads(json.dumps(report.to_dict()))["duplicate_counts"]["within_class"] == 0
    assert "usable images in 3 classes" in rendered(report)


def test_duplicates_within_and_across_classes(tmp_path):
    written = make_image_tree(tmp_path / "data", {"cat": 5, "dog": 5})
    cat, dog = tmp_path / "data" / "cat", tmp_path / "data" / "dog"
    shutil.copy(written["cat"][0], cat / "copy.png")  # exact, same class
    near_copy(written["cat"][1], cat / "near.jpg")  # near, same class
    shutil.copy(written["cat"][2], dog / "stolen.png")  # exact, other label
    near_copy(written["dog"][3], cat / "looks_like_dog.jpg")  # near, other label
    whole = written["dog"][0].read_bytes()
    (cat / "broken.png").write_bytes(whole[: len(whole) // 2])
    report = audit(scan_tree(tmp_path / "data", tmp_path / "out").records_path)

    exact = {tuple(g.paths): g for g in report.exact_duplicates}
    assert set(exact) == {(str(written["cat"][0]), str(cat / "copy.png")),
                          (str(written["cat"][2]), str(dog / "stolen.png"))}
    near = {tuple(g.paths): g for g in report.near_duplicates}
    assert set(near) == {(str(written["cat"][1]), str(cat / "near.jpg")),
                         (str(cat / "looks_like_dog.jpg"), str(written["dog"][3]))}
    assert all(0 <= g.distance <= 4 for g in near.values())
    assert {tuple(g.paths) for g in report.within_class} == {(str(written["cat"][0]), str(cat / "copy.png")),
                                                             (str(written["cat"][1]), str(cat / "near.jpg"))}
    conflicts = {tuple(g.labels) for g in report.across_classes}
    assert conflicts == {("cat", "dog")}  # both conflicts list cat first
    assert len(report.across_classes) == 2 and not report.across_splits
    assert report.rejected == [{"path": str(cat / "broken.png"), "label": "cat", "reason": "truncated or corrupt",
                                "detail": report.rejected[0]["detail"]}]
    text = rendered(report)
    assert "label conflict" in text and str(dog / "stolen.png") in text and "broken.png" in text


def test_leakage_across_an_existing_split_layout(tmp_path):
    train = make_image_tree(tmp_path / "data" / "train", {"cat": 3, "dog": 3}, seed=0)
    make_image_tree(tmp_path / "data" / "test", {"cat": 2, "dog": 2}, seed=1)
    shutil.copy(train["cat"][0], tmp_path / "data" / "test" / "cat" / "again.png")
    near_copy(train["dog"][1], tmp_path / "data" / "test" / "dog" / "again.jpg")
    report = audit(scan_tree(tmp_path / "data", tmp_path / "out"))
    leaks = report.across_splits
    assert len(leaks) == 2 and {g.kind for g in leaks} == {"exact", "near"}
    assert all(sorted(g.splits) == ["test", "train"] for g in leaks)
    assert any("span splits" in w for w in report.warnings)


def test_leakage_from_a_manifest(tmp_path):
    written = make_image_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    shutil.copy(written["cat"][0], tmp_path / "data" / "cat" / "copy.png")
    records = load_ok_records(scan_tree(tmp_path / "data", tmp_path / "out").records_path)
    assert not audit(records).across_splits  # no split known yet
    rows = [{"path": r["path"], "label": r["label"], "split": "test" if r["path"].endswith("copy.png") else "train",
             "sha1": r["sha1"], "width": r["width"], "height": r["height"]} for r in records]
    assert audit(records, manifest=rows).across_splits[0].paths == [str(written["cat"][0]),
                                                                   str(tmp_path / "data" / "cat" / "copy.png")]
    with open(tmp_path / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert len(audit(records, manifest=tmp_path / "manifest.csv").across_splits) == 1
    assert not [w for w in audit(records, manifest=rows).warnings if "manifest given" in w]
    other = [{**row, "path": row["path"].replace("data", "elsewhere")} for row in rows]
    assert [w for w in audit(records, manifest=other).warnings if "lists other data" in w]


def test_duplicate_groups_are_connected_components():
    base = 0x0123456789ABCDEF
    records = [
        {"sha1": "a", "phash": f"{base:016x}"},
        {"sha1": "b", "phash": f"{base ^ 0b111:016x}"},  # 3 bits from 0
        {"sha1": "c", "phash": f"{base ^ 0b111 ^ 0b111000:016x}"},  # 3 from 1, 6 from 0: chained
        {"sha1": "d", "phash": f"{~base & (2**64 - 1):016x}"},  # far from all
        {"sha1": "a", "phash": f"{~base & (2**64 - 1):016x}"},  # same bytes as 0 (hash irrelevant)
        {"sha1": None, "phash": None},  # a rejected record
        {"sha1": "e", "phash": f"{base ^ (1 << 63):016x}"},  # 1 bit from 0, top bit
    ]
    assert duplicate_groups(records, 4) == [[0, 1, 2, 3, 4, 6]]  # 3 joins through 4's exact link to 0
    assert duplicate_groups(records, 0) == [[0, 3, 4]]
    assert duplicate_groups(records[:4], 2) == []


@pytest.mark.parametrize("distance", [0, 1, 3, 4, 7, 12])
def test_multi_index_search_equals_brute_force(distance):
    rng = np.random.default_rng(distance)
    hashes = rng.integers(0, 2**64, size=1500, dtype=np.uint64)
    for i in range(0, 300, 3):  # plant neighbours at every distance up to distance + 2
        flips = rng.choice(64, size=int(rng.integers(0, distance + 3)), replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    hashes[500:520] = hashes[499]  # a crowded bucket of identical hashes
    xor = hashes[:, None] ^ hashes[None, :]
    hamming = np.unpackbits(xor.view(np.uint8).reshape(len(hashes), len(hashes), 8), axis=2).sum(axis=2)
    first, second = np.nonzero(np.triu(hamming <= distance, k=1))
    brute = sorted(zip(first.tolist(), second.tolist(), hamming[first, second].tolist()))
    assert near_duplicate_pairs(hashes, distance) == brute
    assert len(brute) >= 190  # the identical block alone gives 21 * 20 / 2 pairs


def test_big_bucket_is_compared_in_blocks(monkeypatch):
    monkeypatch.setattr(audit_module, "_PAIR_BLOCK", 7)
    hashes = np.array([5] * 9 + [6], dtype=np.uint64)
    assert len(near_duplicate_pairs(hashes, 0)) == 9 * 8 // 2
    assert len(near_duplicate_pairs(hashes, 2)) == 10 * 9 // 2


def test_inputs_and_user_errors(tmp_path):
    make_image_tree(tmp_path / "data", {"a": 2, "b": 2})
    result = scan_tree(tmp_path / "data", tmp_path / "out")
    by_result, by_path = audit(result), audit(str(result.records_path))
    assert by_result.to_dict() == by_path.to_dict()
    with pytest.raises(UserError, match="nowhere.jsonl"):
        audit(tmp_path / "nowhere.jsonl")
    with pytest.raises(UserError, match="between 0 and 32"):
        audit(result, config=DataConfig(near_duplicate_distance=40))
    empty = audit([])
    assert empty.class_counts == {} and empty.imbalance_ratio is None and "0 usable images" in rendered(empty)


def test_many_images_stay_fast(tmp_path):
    """Multi-index search on 20k random hashes: far from the 200M pair comparisons of brute force."""
    rng = np.random.default_rng(0)
    records = [{"sha1": str(i), "phash": f"{int(h):016x}"} for i, h in
               enumerate(rng.integers(0, 2**64, size=20_000, dtype=np.uint64))]
    records.append({"sha1": "x", "phash": records[7]["phash"]})
    assert duplicate_groups(records, 4) == [[7, 20_000]]



def test_phash_match_needs_dhash_confirmation():
    """Same layout (equal phash) but different content (dhash far apart) is not a duplicate."""
    base = {"label": "a", "split": None, "status": "ok", "width": 28, "height": 28}
    records = [
        {**base, "path": "/x/1.png", "sha1": "1", "phash": "ffff0000ffff0000", "dhash": "0000000000000000"},
        {**base, "path": "/x/2.png", "sha1": "2", "phash": "ffff0000ffff0000", "dhash": "ffffffffffffffff"},
        {**base, "path": "/x/3.png", "sha1": "3", "phash": "ffff0000ffff0001", "dhash": "0000000000000001"},
    ]
    assert duplicate_groups(records, 4) == [[0, 2]]
