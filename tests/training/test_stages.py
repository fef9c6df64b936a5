"""Which parameters learn in each phase, and that frozen BatchNorm statistics never move."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from effitune.models.backbones import create_backbone, num_stages
from effitune.models.network import Network
from effitune.training.module import Optimization, PhaseModule
from effitune.training.recipe import auto_depths
from effitune.training.stages import BATCHNORM_TYPES, Phase


def make_network(name="tf_efficientnet_lite0", classes=3):
    torch.manual_seed(0)
    backbone, _ = create_backbone(name, classes, pretrained=False)
    return Network(backbone, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def one_step(network, phase, train_bn=False):
    module = PhaseModule(network, phase, "images", Optimization(lr=0.1, weight_decay=0.0, epochs=1,
                                                                 steps_per_epoch=1), train_bn=train_bn)
    module.train()
    images = torch.rand(4, 3, 64, 64)
    loss = module.loss(module(images), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    return {name for name, p in network.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def bn_stats(network):
    return {name: buf.clone() for name, buf in network.named_buffers() if "running" in name}


@pytest.mark.parametrize("phase, allowed_prefixes", [
    (Phase(None), ("backbone.classifier.",)),
    (Phase(1), ("backbone.classifier.", "backbone.conv_head.", "backbone.blocks.6.")),
    (Phase(2), ("backbone.classifier.", "backbone.conv_head.", "backbone.blocks.6.", "backbone.blocks.5.")),
])
def test_gradients_reach_only_the_phase_layers(phase, allowed_prefixes):
    network = make_network()
    before = bn_stats(network)
    learned = one_step(network, phase)
    assert learned, "nothing learned"
    assert all(name.startswith(allowed_prefixes) for name in learned), sorted(learned)[:5]
    # every allowed group really learns (the last stage's convolutions, the head)
    for prefix in allowed_prefixes:
        assert any(name.startswith(prefix) for name in learned), prefix
    # BatchNorm: no gradient to its affine parameters, statistics unchanged by a training forward
    bn_params = {f"{m}.{p}" for m, mod in network.named_modules() if isinstance(mod, BATCHNORM_TYPES)
                 for p, _ in mod.named_parameters(recurse=False)}
    assert not (learned & bn_params)
    after = bn_stats(network)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_bn_lets_tail_statistics_move():
    network = make_network()
    before = bn_stats(network)
    one_step(network, Phase(1), train_bn=True)
    after = bn_stats(network)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("backbone.blocks.6.", "backbone.bn2.")) for k in moved)


def test_all_layers_phase():
    network = make_network()
    learned = one_step(network, Phase(-1))
    assert any(name.startswith("backbone.conv_stem.") for name in learned)


def test_resolve_depths():
    stages = num_stages(make_network().backbone)
    assert auto_depths("auto", 3, stages, "cpu", 500) == [1, 2, 3]
    assert auto_depths("1", 3, stages, "cpu", 500) == [1]
    assert auto_depths(0, 3, stages, "cpu", 500) == []
    assert auto_depths("all", 3, stages, "cpu", 500) == [-1]
    assert auto_depths(99, 3, stages, "cpu", 500) == [-1]


@pytest.mark.parametrize("left_in", ["train", "eval"])
@pytest.mark.parametrize("phase, inputs", [(Phase(None), "features"), (Phase(1), "prefix"), (Phase(-1), "images")])
def test_lightning_fit_trains_in_the_phase_modes_whatever_mode_the_network_was_left_in(left_in, phase, inputs):
    """Lightning does not call .train() when fitting starts: a network left in eval mode (the caching pass
    does that) must still train with dropout on, one left in train mode must not move frozen BN statistics."""
    network = make_network()
    network.dropout.p = 0.5
    network.eval()
    with torch.no_grad():
        images = torch.rand(8, 3, 64, 64)
        x = {"features": network.features(images), "prefix": network.prefix(images, 1), "images": images}[inputs]
    getattr(network, left_in)()
    before = bn_stats(network)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            bn_training = {m.training for m in network.modules() if isinstance(m, BATCHNORM_TYPES)}
            seen.append((network.dropout.training, bn_training, network.backbone.conv_stem.training))

    data = TensorDataset(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    module = PhaseModule(network, phase, inputs, Optimization(lr=0.01, weight_decay=0.0, epochs=2, steps_per_epoch=2))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Spy()])
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    frozen_stem_training = phase.depth == -1  # only the all-layers phase trains the stem
    assert seen == [(True, {False}, frozen_stem_training)] * 4  # both epochs: the second runs after validation
    after = bn_stats(network)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("depth", [None, 1, 3, -1])
def test_a_phase_name_reads_back_as_the_phase(depth):
    assert Phase.from_name(Phase(depth).name) == Phase(depth)
