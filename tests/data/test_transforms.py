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
