import numpy as np
import pytest
import torch
from PIL import Image

from effitune.data.batches import ImageBatches
from effitune.data.cache import ImageCache
from effitune.data.datamodule import ImageDataModule, ImageDataset



def write_images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    paths = write_images(folder, 11)
    cache = ImageCache(folder / "cache", 16)
    keys = cache.build(paths[:6], workers=1) + cache.build(paths[6:], workers=1)  # two shard files
    assert len(cache.index.shards) == 2
    return ImageDataset(cache, keys, np.arange(11) % 3)


def gathered(dataset, indices):
    return torch.from_numpy(np.stack([dataset.cache.get(dataset.keys[i]) for i in indices])).permute(0, 3, 1, 2)


def test_batches_in_order_equal_the_cache(dataset):
    batches = list(ImageBatches(dataset, 4, threads=3, prefetch=2, pin=False))
    assert [len(labels) for _, labels in batches] == [4, 4, 3] and len(ImageBatches(dataset, 4)) == 3
    images = torch.cat([images for images, _ in batches])
    assert torch.equal(images, gathered(dataset, range(11)))
    assert images.dtype == torch.uint8 and batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([labels for _, labels in batches]).tolist() == (np.arange(11) % 3).tolist()


def test_shuffle_is_a_seeded_permutation_per_epoch(dataset):
    def epoch_order(loader):
        order = []
        for images, labels in loader:
            for image, label in zip(images, labels):
                index = next(i for i in range(11) if torch.equal(image, gathered(dataset, [i])[0]))
                assert label == dataset.labels[index]
                order.append(index)
        return order
    loader = ImageBatches(dataset, 4, shuffle=True, seed=5, pin=False)
    first, again = epoch_order(loader), epoch_order(loader)
    loader.set_epoch(1)
    second = epoch_order(loader)
    assert sorted(first) == sorted(second) == list(range(11)) and again == first  # the epoch sets the order
    assert first != second  # a new permutation every epoch
    assert epoch_order(ImageBatches(dataset, 3, shuffle=True, seed=5, pin=False)) == first  # seed + epoch only


def test_ranks_take_disjoint_equal_shares(dataset):
    shares = [ImageBatches(dataset, 2, shuffle=True, seed=1, rank=r, world=3, pin=False) for r in range(3)]
    orders = [share.order() for share in shares]
    assert {len(order) for order in orders} == {4} and {len(share) for share in shares} == {2}
    together = np.concatenate(orders)
    assert set(together.tolist()) == set(range(11)) and len(together) == 12  # one index repeated, as DDP pads


def test_sampler_draws_the_indices(dataset):
    sampler = torch.utils.data.WeightedRandomSampler(np.r_[np.zeros(10), 1.0], num_samples=5,
                                                     generator=torch.Generator().manual_seed(0))
    batches = list(ImageBatches(dataset, 2, sampler=sampler, pin=False))
    assert len(batches) == 3
    assert all(torch.equal(image, gathered(dataset, [10])[0]) for images, _ in batches for image in images)
    uniform = torch.utils.data.WeightedRandomSampler(np.ones(11), num_samples=11, generator=torch.Generator())
    loader = ImageBatches(dataset, 4, sampler=uniform, pin=False)
    first = loader.order().tolist()
    loader.set_epoch(1)
    second = loader.order().tolist()
    loader.set_epoch(0)
    assert loader.order().tolist() == first != second  # the draws of an epoch, whatever was drawn before


def test_refuses_a_per_sample_transform(dataset):
    augmented = ImageDataset(dataset.cache, dataset.keys, dataset.labels, transform=lambda image: image)
    with pytest.raises(ValueError, match="BatchAugment"):
        ImageBatches(augmented, 4)


def test_gpu_datamodule_serves_image_batches(dataset):
    rows = [{"label": f"c{label}", "split": "train" if i < 8 else "val"} for i, label in enumerate(dataset.labels)]
    module = ImageDataModule(rows, dataset.keys, ["c0", "c1", "c2"], dataset.cache, batch_size=4, workers=2,
                             device_augment=True)
    train, val = module.train_dataloader(), module.val_dataloader()
    assert isinstance(train, ImageBatches) and train.shuffle and not val.shuffle
    assert sum(len(labels) for _, labels in train) == 8
    cpu = ImageDataModule(rows, dataset.keys, ["c0", "c1", "c2"], dataset.cache, batch_size=4, workers=0)
    assert isinstance(cpu.train_dataloader(), torch.utils.data.DataLoader)


def test_stack_reads_into_a_given_array(dataset):
    out = np.zeros((3, 16, 16, 3), np.uint8)
    indices = [7, 1, 9]
    assert dataset.cache.stack([dataset.keys[i] for i in indices], out=out) is out
    assert torch.equal(torch.from_numpy(out).permute(0, 3, 1, 2), gathered(dataset, indices))
    one_shard = [dataset.keys[i] for i in (8, 6, 10)]
    assert np.array_equal(dataset.cache.stack(one_shard, out=np.empty((3, 16, 16, 3), np.uint8)),
                          dataset.cache.stack(one_shard))


def test_lightning_trains_from_image_batches(dataset):
    """The GPU training path (ImageBatches + BatchAugment in the module), run by a real Lightning fit on the CPU."""
    import lightning as L

    from effitune.data.transforms import BatchAugment
    from effitune.models.backbones import create_backbone
    from effitune.models.network import Network
    from effitune.training.callbacks import SetEpoch
    from effitune.training.module import Optimization, PhaseModule
    from effitune.training.stages import Phase

    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3)
    train = ImageBatches(dataset, 4, shuffle=True, pin=False)
    module = PhaseModule(network, Phase(1), "images", Optimization(1e-3, 0.0, 2, len(train)),
                         batch_augment=BatchAugment(16))
    before = network.backbone.get_classifier().weight.detach().clone()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SetEpoch(train)])
    trainer.fit(module, train, ImageBatches(dataset, 8, pin=False))
    assert trainer.global_step == 2 * len(train) and train.epoch == 1  # the trainer's epoch, set by SetEpoch
    assert "val_acc" in trainer.callback_metrics and not torch.equal(before, network.backbone.get_classifier().weight)


def test_pad_batch_repeats_the_last_row():
    from effitune.data.batches import pad_batch

    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3:], x[[2, 2]])
    assert pad_batch(x, 3) is x and pad_batch(x, 2) is x and pad_batch(x[:0], 4).shape == (0, 2)
    images = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert pad_batch(images, 4).is_contiguous(memory_format=torch.channels_last)  # the full batches' layout


def test_phase_module_pads_partial_batches_to_the_first_full_shape():
    """GPU runs pad a partial batch (no new cuDNN shape) and cut the padding off: same logits, same loss."""
    from effitune.models.backbones import create_backbone
    from effitune.models.network import Network
    from effitune.training.module import Optimization, PhaseModule
    from effitune.training.stages import Phase

    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3)
    shapes = []
    network.register_forward_hook(lambda module, inputs, output: shapes.append(len(inputs[0])))
    module = PhaseModule(network, Phase(1), "images", Optimization(1e-3, 0.0, 1, 1), pad_batches=True).eval()
    full, partial = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 255, (3, 3, 32, 32),
                                                                                            dtype=torch.uint8)
    with torch.no_grad():
        module._logits(full, "val")
        padded = module._logits(partial, "val")
        plain = module(partial)
    assert shapes == [4, 4, 3] and padded.shape == (3, 3)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
    bn_trains = PhaseModule(network, Phase(1), "images", Optimization(1e-3, 0.0, 1, 1), train_bn=True,
                            pad_batches=True)
    shapes.clear()
    with torch.no_grad():
        bn_trains._logits(full, "train"), bn_trains._logits(partial, "train")
    assert shapes == [4, 3]  # batch statistics would see the padding: not padded


def test_a_stopped_epoch_leaves_no_reads_behind(dataset, monkeypatch):
    """The second read is held until the pool has been shut down, so no clock decides what ran."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from effitune.data import batches as batches_module

    reads, shut = [], threading.Event()
    original = ImageBatches._read

    class Pool(ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)  # queued reads cancelled here
            shut.set()
            super().shutdown(wait=wait)

    def held_read(self, indices):
        reads.append(len(indices))
        if len(reads) > 1:
            assert shut.wait(30), "the pool was never shut down"
        return original(self, indices)
    monkeypatch.setattr(batches_module, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(ImageBatches, "_read", held_read)
    loader = ImageBatches(dataset, 1, threads=1, prefetch=6, pin=False)
    batches = iter(loader)
    next(batches)
    batches.close()  # training stopped mid-epoch: queued reads are cancelled, not run to the end
    assert 1 <= len(reads) <= 2  # the first, and the one its only thread may have started
    monkeypatch.setattr(ImageBatches, "_read", original)
    assert sum(len(labels) for _, labels in loader) == 11  # and the loader still serves whole epochs
