"""Frozen-prefix caching is exact: cached activations equal the frozen layers' live output."""
import numpy as np
import pytest
import torch
from PIL import Image

from effitune.data.cache import ImageCache
from effitune.data.datamodule import ImageDataset
from effitune.data.transforms import build_augmentation
from effitune.models.backbones import create_backbone
from effitune.models.network import Network
from effitune.training.features import compute_activations


def cached_images(folder, n: int, size: int, seed: int, shape=(40, 40)) -> tuple[ImageCache, list[str]]:
    """`n` random PNGs in `folder`, in a resize-once cache at `size`: (cache, keys)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(paths[-1])
    cache = ImageCache(folder / "cache", size)
    return cache, cache.build(paths, workers=1)


def tiny_augmented_pass(folder, seed: int) -> tuple[Network, ImageDataset]:
    """A random-init lite0 and 4 cached 32-px images with the light augmentation: a caching pass in seconds."""
    cache, keys = cached_images(folder, 4, 32, seed=seed, shape=(20, 20))
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    return network, ImageDataset(cache, keys, np.zeros(4, dtype=np.int64), build_augmentation("light", 32))


@pytest.mark.parametrize("engine", ["auto", "torch"])  # auto = ONNX Runtime on the CPU
def test_cached_activations_match_live_forward(tmp_path, engine):
    cache, keys = cached_images(tmp_path, 5, 64, seed=0)
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    dataset = ImageDataset(cache, keys, np.zeros(5, dtype=np.int64), build_augmentation("standard", 64))
    cached = compute_activations(network, dataset, [1, 2], tmp_path / "features", views=2, batch_size=2,
                                 engine=engine)
    assert cached["depth1"].shape[:2] == (2, 5) and cached["pooled"].shape[:2] == (2, 5)
    images = torch.from_numpy(cache.stack(keys)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        for depth in (1, 2):
            live = network.prefix(images, depth).numpy()
            np.testing.assert_allclose(cached[f"depth{depth}"][0].astype(np.float32), live, rtol=2e-2, atol=2e-2)
            # training the tail on the cache sees the same logits as the whole network
            logits = network.tail(torch.from_numpy(np.array(cached[f"depth{depth}"][0], dtype=np.float32)), depth)
            np.testing.assert_allclose(logits.numpy(), network(images).numpy(), rtol=0.05, atol=0.05)
        np.testing.assert_allclose(cached["pooled"][0].astype(np.float32), network.features(images).numpy(),
                                   rtol=2e-2, atol=2e-2)
    # view 1 is augmented: it differs from the plain view
    assert not np.allclose(cached["depth1"][1], cached["depth1"][0])
    # a second call reuses the files instead of recomputing
    again = compute_activations(network, dataset, [1, 2], tmp_path / "features", views=2, batch_size=2)
    assert np.array_equal(again["depth2"], cached["depth2"])
    # the same images in another order are not served the old rows: the cache is recomputed for them
    reordered = ImageDataset(cache, keys[::-1], np.zeros(5, dtype=np.int64), build_augmentation("standard", 64))
    swapped = compute_activations(network, reordered, [1, 2], tmp_path / "features", views=2, batch_size=2)
    np.testing.assert_allclose(swapped["pooled"][0].astype(np.float32), cached["pooled"][0][::-1].astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_views_augmented_on_the_device_do_not_depend_on_batches_or_threads(tmp_path):
    """The GPU path (images from ImageBatches, BatchAugment per batch with per-image seeds), run on the CPU."""
    from effitune.data.transforms import BatchAugment

    cache, keys = cached_images(tmp_path, 7, 32, seed=1, shape=(40, 50))
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    dataset = ImageDataset(cache, keys, np.zeros(7, dtype=np.int64))
    augment = BatchAugment(32)
    runs = [compute_activations(network, dataset, [1], tmp_path / f"f{batch}", views=3, batch_size=batch,
                                workers=workers, batch_augment=augment, engine="torch")
            for batch, workers in ((2, 1), (5, 3))]
    for name in ("pooled", "depth1"):
        np.testing.assert_allclose(runs[0][name].astype(np.float32), runs[1][name].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
    assert not np.allclose(runs[0]["pooled"][1], runs[0]["pooled"][0], atol=1e-2)  # view 1 is augmented
    assert not np.allclose(runs[0]["pooled"][1], runs[0]["pooled"][2], atol=1e-2)  # and differs from view 2
    with torch.inference_mode():
        live = network.features(torch.from_numpy(cache.stack(keys)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(runs[1]["pooled"][0].astype(np.float32), live, rtol=2e-2, atol=2e-2)


def test_a_failed_write_is_raised_and_an_earlier_error_is_not_hidden(tmp_path, monkeypatch):
    from effitune.data import rowio
    from effitune.training import features

    def broken(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(rowio, "write_rows", broken)
    array = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=(1, 4, 2))
    writer = features._RowWriter(depth=1)
    writer.put(array, 0, torch.zeros(2, 2))
    with pytest.raises(OSError, match="No space"):
        writer.put(array, 2, torch.zeros(2, 2))  # the queue is full: the failed first write surfaces here
        writer.close()
    writer = features._RowWriter()
    writer.put(array, 0, torch.zeros(2, 2))
    writer.abandon()  # after another error: the failed write stays out of the way
    assert not writer.pending


def test_a_failed_caching_pass_raises_and_leaves_no_partial_files(tmp_path, monkeypatch):
    from effitune.data import rowio

    cache, keys = cached_images(tmp_path, 3, 32, seed=2, shape=(20, 20))
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    original = rowio.write_rows

    def fails_on_the_second_file(array, *args, **kwargs):
        if "depth1" in str(getattr(array, "filename", "")):
            raise OSError("No space left on device")
        return original(array, *args, **kwargs)
    monkeypatch.setattr(rowio, "write_rows", fails_on_the_second_file)
    with pytest.raises(OSError, match="No space"):
        compute_activations(network, ImageDataset(cache, keys, np.zeros(3, dtype=np.int64)), [1],
                            tmp_path / "features", batch_size=2, engine="torch")
    assert not list((tmp_path / "features").glob("*.npy")) and not (tmp_path / "features" / "activations.json").exists()


def test_views_augmented_per_sample_follow_their_seeds_in_any_batching(tmp_path):
    """CPU views (augmented per sample in loader workers): row (view v, image i) is image i under
    view_seed(v, i), however the (views x images) rows are batched, with or without workers."""
    from effitune.training.features import view_seed

    cache, keys = cached_images(tmp_path, 5, 32, seed=3, shape=(30, 45))
    torch.manual_seed(0)
    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    dataset = ImageDataset(cache, keys, np.zeros(5, dtype=np.int64), build_augmentation("standard", 32))
    runs = [compute_activations(network, dataset, [1], tmp_path / f"f{batch}", views=3, batch_size=batch,
                                workers=workers, engine="torch")
            for batch, workers in ((2, 0), (4, 2))]  # batches of 4 straddle views 1 and 2
    np.testing.assert_allclose(runs[0]["pooled"].astype(np.float32), runs[1]["pooled"].astype(np.float32),
                               rtol=1e-2, atol=1e-2)
    for view, index in ((1, 4), (2, 0), (2, 3)):
        torch.manual_seed(view_seed(view, index))
        image, _ = dataset[index]
        with torch.inference_mode():
            live = network.features(image[None]).numpy()[0]
        np.testing.assert_allclose(runs[1]["pooled"][view, index].astype(np.float32), live, rtol=2e-2, atol=2e-2)
    assert not np.allclose(runs[1]["depth1"][1], runs[1]["depth1"][2], atol=1e-2)  # the views differ


def test_loader_workers_start_before_the_first_forward(tmp_path, monkeypatch):
    """Workers forked after the frozen forward has filled its memory make every page of it copy-on-write
    (4-5x slower views at 224 px on a CPU): the augmented views' workers must already run at the first batch."""
    import multiprocessing

    from effitune.training import features

    network, dataset = tiny_augmented_pass(tmp_path, seed=4)
    children_at_forward = []
    capture = features._capture

    def recording(*args, **kwargs):
        children_at_forward.append(len(multiprocessing.active_children()))
        return capture(*args, **kwargs)
    monkeypatch.setattr(features, "_capture", recording)
    compute_activations(network, dataset, [1], tmp_path / "features", views=2, batch_size=2, workers=1,
                        engine="torch")
    assert len(children_at_forward) == 4 and children_at_forward[0] >= 1


def test_view_seeds_differ_between_the_views_of_an_image_within_32_bits():
    """torch's CPU generator keeps only a seed's low 32 bits: each view of an image needs its own."""
    from effitune.training.features import view_seed

    for index in (0, 7, 123_456):
        seeds = [view_seed(view, index) for view in range(8)]
        assert len(set(seeds)) == 8 and all(0 <= seed < 2**32 for seed in seeds)
    assert view_seed(1, 5) == view_seed(1, 5) and view_seed(1, 5) != view_seed(1, 6)


def test_an_error_while_caching_stops_the_loader_workers_at_once(tmp_path, monkeypatch):
    """The augmented views' workers start before view 0: an error there must stop them, even while the
    traceback (and so the pass's frame) is still held, e.g. by a notebook."""
    import multiprocessing

    from effitune.training import features

    network, dataset = tiny_augmented_pass(tmp_path, seed=5)

    class BrokenReads:
        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            raise OSError("Input/output error")
    monkeypatch.setattr(features, "ImageBatches", BrokenReads)
    with pytest.raises(OSError, match="Input/output") as caught:
        compute_activations(network, dataset, [1], tmp_path / "features", views=3, batch_size=2, workers=2,
                            engine="torch")
    assert caught.value is not None and multiprocessing.active_children() == []


@pytest.mark.parametrize("workers, spinning", [(0, "1"), (1, "0")])
def test_onnx_runtime_threads_sleep_when_loader_workers_share_the_cores(tmp_path, monkeypatch, workers, spinning):
    """Busy-waiting ONNX Runtime threads take the augmenting workers' time (96 px, 2 cores: 1.14x slower)."""
    import onnxruntime

    network, dataset = tiny_augmented_pass(tmp_path, seed=5)
    seen = []
    session = onnxruntime.InferenceSession

    def recording(path, options, **kwargs):
        seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        return session(path, options, **kwargs)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    compute_activations(network, dataset, [1], tmp_path / "features", views=2, batch_size=2, workers=workers)
    assert seen == [spinning]


def test_frozen_layers_stay_in_pytorch_when_onnx_runtime_disagrees(tmp_path, monkeypatch):
    """The exported frozen layers are checked against PyTorch once, before any image is cached with them."""
    from effitune.training import features

    network, _ = tiny_augmented_pass(tmp_path, seed=6)
    run = features.onnx_capture(network, [1, 2], 32)
    assert run is not None and features._largest_difference(run, features._CaptureModule(network, [1, 2]), 32) < 1e-4
    monkeypatch.setattr(features, "_largest_difference", lambda run, module, size: 0.5)
    with pytest.warns(UserWarning, match="PyTorch eager.*differs from it by up to 5.0e-01"):
        assert features.onnx_capture(network, [1, 2], 32) is None
