"""Training on several processes: one bundle, the same accuracy, the data stages split between the ranks.

The end-to-end test trains the same tiny, easy data set in 1 and in 2 CPU processes (gloo, started by
`train(devices=2)` itself); the rest checks the sharding and launcher helpers without training.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_colour_dataset
from PIL import Image

from effitune import distributed
from effitune.config import ConfigError, load_config
from effitune.data.cache import ImageCache
from effitune.errors import UserError

# Launched processes import this module to find their function: torch, timm & co. load inside the tests.

FAST = {"train.stage1.epochs": 8, "train.stage2.epochs": 8, "data.image_size": 64, "train.unfreeze": "1",
        "train.batch_size": 16, "train.accelerator": "cpu"}


def write_images_for_cache(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


# --- end to end: 1 process vs 2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from effitune.pipeline import train

    root = tmp_path_factory.mktemp("ddp")
    data = make_colour_dataset(root / "data")
    one = train(data, out=root / "one", config=load_config(overrides=FAST), cache_root=root / "cache-one",
                progress=False)
    two = train(data, out=root / "two", config=load_config(overrides={**FAST, "train.devices": "2"}),
                cache_root=root / "cache-two", progress=False)
    return root, one, two


def test_two_processes_make_one_bundle_as_good_as_one(runs):
    root, one, two = runs
    assert two.run_dir == root / "two" and two.metrics, "rank 0's result comes back to the caller"
    # colour-tinted classes: both far above chance (1/3); 1 test image in 9 is 0.11 of noise
    assert one.metrics["accuracy"] >= 0.75 and two.metrics["accuracy"] >= 0.75
    assert abs(one.metrics["accuracy"] - two.metrics["accuracy"]) <= 0.23
    meta = json.loads((root / "two" / "model" / "effitune.json").read_text())
    assert meta["config"]["train"]["devices"] == "2" and meta["classes"] == ["blue", "green", "red"]
    assert {p["phase"] for p in meta["phases"]} == {"stage1", "stage2-depth1"}


def test_only_rank_zero_wrote_the_run(runs):
    root, _, _ = runs
    run = root / "two"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("model")) == ["model"]  # no 2nd, no staging
    with open(run / "history.csv", newline="") as stream:
        rows = [(r["phase"], int(r["epoch"])) for r in csv.DictReader(stream)]
    assert len(rows) == len(set(rows)) > 2  # one row per phase and epoch, not one per rank
    for phase in {p for p, _ in rows}:
        epochs = [e for p, e in rows if p == phase]
        assert epochs == list(range(len(epochs)))
    assert not [p.name for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith("records.jsonl.")]
    # the same split and the same record order as one process
    assert (run / "manifest.csv").read_text() == (root / "one" / "manifest.csv").read_text()


def test_scan_and_caches_were_sharded(runs):
    root, _, _ = runs
    shares = json.loads((root / "two" / "distributed.json").read_text())
    assert shares["world_size"] == 2 and shares["launcher"] == "torchelastic"
    counts = shares["shares"]
    assert counts["scan"] == [30, 30] and counts["images"] == [30, 30]  # 60 images, every other one each
    n_train = sum(1 for row in csv.DictReader(open(root / "two" / "manifest.csv")) if row["split"] == "train")
    assert sum(counts["features/train"]) == n_train and min(counts["features/train"]) > 0
    # resize-once cache: one shard file per rank, disjoint rows, every image once
    index = json.loads(next((root / "cache-two").glob("size*/index.json")).read_text())
    assert len(index["shards"]) == 2 and len(index["entries"]) == 60
    assert sorted(np.bincount([shard for shard, _ in index["entries"].values()])) == [30, 30]


def test_feature_cache_does_not_depend_on_the_number_of_ranks(runs):
    root, _, _ = runs
    for split in ("train", "val"):
        single = root / "one" / "features" / split
        sharded = root / "two" / "features" / split
        for name in ("pooled", "depth1"):
            whole = np.load(single / f"{name}.npy").astype(np.float32)
            parts = np.concatenate([np.load(sharded / f"{name}.part{r}.npy") for r in range(2)], axis=1)
            assert parts.shape == whole.shape  # (views, N, ...): augmented views too
            np.testing.assert_allclose(parts.astype(np.float32), whole, rtol=0.02, atol=0.02)


# --- errors travel to every rank ----------------------------------------------------------------------

def _cache_with_a_broken_file(paths: list[str], root: str) -> None:
    """Runs in each launched process."""
    assert distributed.each_rank(distributed.rank) == [0, 1]
    assert distributed.from_main(distributed.rank()) == 0
    assert distributed.on_main(lambda: "made on rank 0") == "made on rank 0"
    ImageCache(root, 16).build(paths, workers=1, sharded=True)


def test_a_bad_file_on_rank_one_is_one_clear_error(tmp_path):
    paths = write_images_for_cache(tmp_path, 4)
    Path(paths[3]).write_bytes(b"broken after the scan")  # file 3 is rank 1's share (every other one)
    with pytest.raises(UserError, match="3.png can no longer be decoded"):
        distributed.launch(_cache_with_a_broken_file, 2, paths=paths, root=str(tmp_path / "cache"))


# --- helpers, without processes ---------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_range_blocks_are_disjoint_and_cover_everything(world):
    for n in range(0, 13):
        blocks = [distributed.shard_range(n, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


@pytest.mark.parametrize("on_disk", [False, True])
def test_row_blocks_read_like_one_array(tmp_path, on_disk, monkeypatch):
    from effitune.data import rowio
    from effitune.training.features import RowBlocks

    whole = np.arange(2 * 7 * 3, dtype=np.float16).reshape(2, 7, 3)
    parts = [(4, 7, whole[:, 4:]), (0, 4, whole[:, :4])]
    if on_disk:  # the part files of a sharded cache, opened as memory maps and read with positional I/O
        for i, (_, _, part) in enumerate(parts):
            np.save(tmp_path / f"part{i}.npy", part)
        parts = [(a, b, np.load(tmp_path / f"part{i}.npy", mmap_mode="r")) for i, (a, b, _) in enumerate(parts)]
        reads = []
        monkeypatch.setattr(rowio, "_read_into", lambda fd, buffer, offset, real=rowio._read_into:
                            reads.append(offset) or real(fd, buffer, offset))
    blocks = RowBlocks(parts)
    assert blocks.shape == whole.shape and len(blocks) == 2
    rows = np.array([0, 3, 4, 6])
    assert np.array_equal(blocks[1, rows], whole[1, rows]) and np.array_equal(blocks[-1, rows], whole[-1, rows])
    assert np.array_equal(blocks[0], whole[0]) and np.array_equal(np.asarray(blocks), whole)
    if on_disk:
        assert reads, "rows were read through the memory map"


def test_alone_the_collectives_just_call():
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.launcher() is None
    assert distributed.each_rank(lambda: 7) == [7]
    assert distributed.on_main(lambda x: x + 1, 1) == 2 and distributed.from_main("a") == "a"
    with pytest.raises(UserError):
        distributed.on_main(lambda: (_ for _ in ()).throw(UserError("no")))


def test_plan_under_torchrun_takes_the_launchers_numbers(monkeypatch):
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (3, 4, 1)
    plan = distributed.plan("auto")
    assert (plan.per_node, plan.num_nodes, plan.launch, plan.strategy, plan.devices) == (2, 2, "torchelastic", "ddp", 2)
    with pytest.raises(UserError, match="--devices 3 .* torchrun --nproc-per-node started 2"):
        distributed.plan("3")
    with pytest.raises(UserError, match="--num-nodes 3 does not match the launcher's 2"):
        distributed.plan("2", num_nodes=3)


def test_plan_under_slurm(monkeypatch):
    for name, value in {"SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed.launcher() == "slurm" and (distributed.rank(), distributed.local_world_size()) == (3, 2)
    plan = distributed.plan("auto")
    assert (plan.per_node, plan.num_nodes, plan.launch) == (2, 2, "slurm")
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive shell inside an allocation: one process
    assert distributed.launcher() is None and distributed.world_size() == 1


def test_plan_without_a_launcher_starts_processes_or_names_the_fix(monkeypatch):
    monkeypatch.setattr(distributed, "cores", lambda: 2)
    assert distributed.plan("auto").launch == "" and distributed.plan("1").strategy == "auto"
    plan = distributed.plan("2")
    assert (plan.launch, plan.per_node, plan.strategy, plan.device) == ("self", 2, "ddp", "cpu")
    with pytest.raises(UserError, match="--devices 3 asks for 3 CPU processes, but this machine has 2 .* --devices 2"):
        distributed.plan("3")
    with pytest.raises(UserError, match="needs a launcher on each one"):
        distributed.plan("auto", num_nodes=2)
    with pytest.raises(UserError, match="GPU indices, but training runs on the CPU"):
        distributed.plan("0,1")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = distributed.plan("0,1", cuda=True)
    assert (gpus.devices, gpus.device, gpus.launch) == ([0, 1], "cuda:0", "self")
    with pytest.raises(UserError, match="names GPU 5, but this machine has 2"):
        distributed.plan("0,5", cuda=True)


@pytest.mark.parametrize("key, value, fragment", [
    ("train.strategy", "dpp", "Did you mean 'ddp'"),
    ("train.strategy", "ddp_spawn", "starts the processes itself"),
    ("train.devices", "two", "train.devices 'two' must be auto"),
    ("train.num_nodes", 0, "train.num_nodes '0'"),
])
def test_config_rejects_bad_distribution_settings(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides={key: value})


@pytest.mark.parametrize("args, fragment", [
    (["--strategy", "dpp"], "Did you mean 'ddp'"),
    (["--devices", "999", "--accelerator", "cpu"], "asks for 999 CPU processes"),
    (["--num-nodes", "2"], "needs a launcher on each one"),
])
def test_cli_bad_distribution_flags_are_one_clear_line(args, fragment, tmp_path):
    from typer.testing import CliRunner

    from effitune.cli import app

    data = make_colour_dataset(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "records.jsonl").exists()  # refused before any work


def test_augmented_views_are_seeded_per_image_not_per_batch(tmp_path):
    import torch

    from effitune.data.datamodule import ImageDataset
    from effitune.data.transforms import build_augmentation
    from effitune.models.backbones import create_backbone
    from effitune.models.network import Network
    from effitune.training.features import compute_activations

    paths = write_images_for_cache(tmp_path, 5)
    cache = ImageCache(tmp_path / "cache", 32)
    keys = cache.build(paths, workers=1)
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    dataset = ImageDataset(cache, keys, np.zeros(5, dtype=np.int64), build_augmentation("standard", 32))
    small = compute_activations(network, dataset, [], tmp_path / "a", views=2, batch_size=2, engine="torch")
    large = compute_activations(network, dataset, [], tmp_path / "b", views=2, batch_size=5, engine="torch")
    np.testing.assert_allclose(small["pooled"][1].astype(np.float32), large["pooled"][1].astype(np.float32),
                               atol=1e-2)
    assert not np.allclose(small["pooled"][1], small["pooled"][0])  # view 1 is augmented


def test_batch_augment_with_seeds_ignores_the_batch():
    import torch

    from effitune.data.transforms import BatchAugment

    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    augment = BatchAugment(32)
    whole = augment(images, seeds=[1, 2, 3, 4])
    assert torch.equal(whole[2:], augment(images[2:], seeds=[3, 4]))
    assert not torch.equal(whole[:1], augment(images[:1], seeds=[9]))
