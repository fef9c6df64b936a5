import pytest
import torch

from effitune.data.transforms import RECIPES, build_augmentation


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_keep_size_and_dtype(name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    out = build_augmentation(name, 40)(image)
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    if name == "none":
        assert torch.equal(out, image)


def test_augmentation_is_random_and_unknown_name_rejected():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    recipe = build_augmentation("strong", 40)
    assert any(not torch.equal(recipe(image), recipe(image)) for _ in range(5))
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augmentation("extreme", 40)


def test_batch_augment_is_per_sample():
    from effitune.data.transforms import BatchAugment

    torch.manual_seed(0)
    one = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    batch = one.expand(8, 3, 48, 48).contiguous()
    out = BatchAugment(32, min_scale=0.5, jitter=0.2)(batch)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.uint8
    # the same image, augmented 8 times: the samples differ from one another
    assert len({o.float().sum().item() for o in out}) > 4
    # full-size crop, square, no jitter: the image itself or its mirror image
    ramp = torch.arange(48, dtype=torch.float32).mul(5).expand(1, 3, 48, 48).to(torch.uint8)
    plain = BatchAugment(48, min_scale=1.0, jitter=0.0, max_aspect=1.0)
    for _ in range(4):
        result = plain(ramp).float()
        assert (result - ramp.float()).abs().max() <= 3 or (result - ramp.flip(-1).float()).abs().max() <= 3
    assert BatchAugment.from_recipe("none", 32) is None


def test_seeded_uniforms_are_a_pure_function_of_each_seed():
    import numpy as np
    from effitune.data.transforms import seeded_uniforms

    seeds = [(1000 + view) * 2**32 + i for view in (1, 2) for i in range(5000)]
    draws = seeded_uniforms(seeds, 7)
    assert draws.shape == (10000, 7) and draws.dtype == np.float32
    assert 0 <= draws.min() and draws.max() < 1
    np.testing.assert_array_equal(seeded_uniforms(seeds[3:5], 7), draws[3:5])  # whatever else is in the batch
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.std() - 12 ** -0.5) < 0.01
    assert abs(np.corrcoef(draws[:5000, 0], draws[5000:, 0])[0, 1]) < 0.05  # views of one image: independent
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.05
