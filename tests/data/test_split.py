import pytest

from effitune.data.manifest import read_manifest, write_manifest
from effitune.data.split import min_images_per_class, split_records
from effitune.errors import UserError


def records(per_class: dict[str, int]):
    out = []
    for label, n in per_class.items():
        for i in range(n):
            out.append({"path": f"/d/{label}/{i:04d}.png", "label": label, "sha1": f"{label}{i}",
                        "width": 32, "height": 32})
    return out


def test_stratified_fractions_and_determinism(tmp_path):
    recs = records({"a": 100, "b": 60, "c": 40})
    first = split_records(recs, val=0.15, test=0.15, seed=3)
    again = split_records(list(reversed(recs)), val=0.15, test=0.15, seed=3)
    key = lambda rows: sorted((r["path"], r["split"]) for r in rows)  # noqa: E731
    assert key(first) == key(again)  # same input + seed -> same split, whatever the order
    assert key(first) != key(split_records(recs, val=0.15, test=0.15, seed=4))
    for label, n in {"a": 100, "b": 60, "c": 40}.items():
        tests = sum(r["split"] == "test" and r["label"] == label for r in first)
        assert abs(tests - 0.15 * n) <= 1.5
    a = write_manifest(first, tmp_path / "m1.csv").read_bytes()
    b = write_manifest(again, tmp_path / "m2.csv").read_bytes()
    assert a == b  # the manifest file itself is identical


def test_duplicate_groups_stay_together():
    recs = records({"a": 40, "b": 40})
    groups = [[0, 1, 2], [40, 41], [5, 45]]  # [5, 45]: the same image in two classes
    for seed in range(5):
        rows = split_records(recs, val=0.2, test=0.2, seed=seed, groups=groups)
        for group in groups:
            assert len({rows[i]["split"] for i in group}) == 1


def test_existing_layout_respected_and_val_carved_from_train():
    recs = records({"a": 30, "b": 30})
    for i, r in enumerate(recs):
        r["split"] = "test" if i % 5 == 0 else "train"
    rows = split_records(recs, val=0.2, test=0.15, seed=0)
    assert [r["split"] == "test" for r in rows] == [r["split"] == "test" for r in recs]
    assert sum(r["split"] == "val" for r in rows) > 0


def test_small_class_error_says_how_many():
    needed = min_images_per_class(0.15, 0.15)
    assert needed == 7
    with pytest.raises(UserError, match=r"'tiny' has 3.*at least 7"):
        split_records(records({"big": 50, "tiny": 3}), val=0.15, test=0.15)


def test_single_class_error():
    with pytest.raises(UserError, match="one class"):
        split_records(records({"only": 50}))


def test_manifest_round_trip_with_odd_names(tmp_path):
    recs = records({"a": 10, "b": 10})
    recs[0]["path"] = "/d/a/caf\udce9.png"  # non-UTF-8 byte kept as a surrogate escape
    rows = split_records(recs, val=0.2, test=0.2)
    path = write_manifest(rows, tmp_path / "manifest.csv")
    back = read_manifest(path)
    assert sorted(r["path"] for r in back) == sorted(r["path"] for r in rows)
    assert all(isinstance(r["width"], int) for r in back)


def test_not_a_manifest(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="missing columns"):
        read_manifest(bad)


def test_duplicates_that_leave_a_class_too_few_distinct_images_are_a_user_error():
    """8 copies of one photo (a burst) are one image for the split: a clear error, not sklearn's traceback."""
    recs = records({"burst": 8, "b": 10})
    with pytest.raises(UserError, match=r"'burst' has 1 \(8 files\)"):
        split_records(recs, groups=[list(range(8))])
    # a few duplicates in a class that still has enough distinct images split as before
    recs = records({"a": 7, "b": 20})
    rows = split_records(recs, groups=[[0, 1]])
    assert {r["split"] for r in rows if r["label"] == "a"} == {"train", "val", "test"}


def test_the_split_does_not_depend_on_the_order_files_were_found_in():
    """Groups are led by their smallest path: a copy of the folder scanned in another order splits the same."""
    import random

    recs = records({"a": 30, "b": 30})
    for i, rec in enumerate(recs):
        rec["sha1"] = f"{rec['label']}{i % 15}"
    key = lambda rows: sorted((r["path"], r["split"]) for r in rows)  # noqa: E731
    results = set()
    for shuffle in range(5):
        shuffled = random.Random(shuffle).sample(recs, len(recs))
        groups = {}
        for index, rec in enumerate(shuffled):
            groups.setdefault(rec["sha1"], []).append(index)
        results.add(tuple(key(split_records(shuffled, seed=0, groups=list(groups.values())))))
    assert len(results) == 1


def test_a_split_column_filled_on_some_rows_only_is_a_user_error():
    recs = records({"a": 10, "b": 10})
    recs[0]["split"] = "test"
    with pytest.raises(UserError, match="1 of 20 images have a split"):
        split_records(recs)


def test_existing_layout_checks_classes_and_keeps_duplicates_together_when_carving_val():
    recs = [{**r, "split": "train"} for r in records({"a": 20, "b": 20})]
    only_tested = [{**r, "split": "test"} for r in records({"c": 3})]
    with pytest.raises(UserError, match="'c' has images in val/ or test/ but none in train/"):
        split_records(recs + only_tested)
    groups = [list(range(10))]  # ten copies of one image in train/a
    for seed in range(4):
        rows = split_records(recs, val=0.2, seed=seed, groups=groups)
        assert len({rows[i]["split"] for i in groups[0]}) == 1
    # small train/ folders carve what they can: a single image stays in train, 5 images give one to val
    few = [{**r, "split": "train"} for r in records({"a": 1, "b": 5, "c": 5})]
    rows = split_records(few, val=0.15)
    assert rows[0]["split"] == "train" and sum(r["split"] == "val" for r in rows) >= 2
    # every train/ image also in test/: nothing to carve from, said plainly
    tested = [{**r, "split": "test", "path": r["path"] + ".copy"} for r in recs]
    with pytest.raises(UserError, match="No validation images can be carved"):
        split_records(recs + tested, val=0.15, groups=[[i, i + 40] for i in range(40)])


def test_the_python_api_splits_and_audits_a_data_folder(tmp_path):
    import effitune
    from conftest import make_image_tree

    make_image_tree(tmp_path / "data", {"cat": 10, "dog": 10})
    rows, notices = effitune.split(tmp_path / "data", out=tmp_path / "work")
    assert len(rows) == 20 and {r["split"] for r in rows} == {"train", "val", "test"} and notices == []
    assert (tmp_path / "work" / "manifest.csv").is_file()
    assert effitune.audit(str(tmp_path / "data")).class_counts == {"cat": 10, "dog": 10}
