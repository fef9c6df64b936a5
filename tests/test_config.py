from pathlib import Path

import pytest

from effitune.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_defaults_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 16\n  stage1:\n    lr: 0.01\ndata:\n  augment: light\n")
    config = load_config(path, {"train.batch_size": 8, "data.seed": None})
    assert config.train.batch_size == 8  # flag beats file
    assert config.train.stage1.lr == 0.01  # file beats default
    assert config.data.augment == "light"
    assert config.data.seed == Config().data.seed  # None flag = not given


def test_unknown_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_sise: 16\n")
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        load_config(path)


@pytest.mark.parametrize("overrides, fragment", [
    ({"data.val": 0.6, "data.test": 0.5}, "sum below 1"),
    ({"data.augment": "heavy"}, "not a recipe"),
    ({"train.unfreeze": "some"}, "must be auto"),
    ({"unknown.score": "knnn"}, "mahalanobis"),
    ({"train.batch_size": "lots"}, "'train.batch_size' must be a whole number, got 'lots'"),
    ({"train.stage1.epochs": 1.5}, "must be a whole number, got 1.5"),
    ({"train.label_smoothing": "a little"}, "must be a number"),
    ({"train.feature_cache": "no"}, "must be true or false"),
    ({"model.dropout": 1.5}, r"model.dropout must be in \[0, 1\)"),
    ({"train.stage1.lr": -1}, "train.stage1.lr must be above 0"),
    ({"train.stage2.epochs": 0}, "train.stage2.epochs must be at least 1"),
    ({"data.image_size": 7}, "at least 32"),
])
def test_invalid_values_rejected(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=overrides)


def test_yaml_numbers_take_the_fields_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  unfreeze: 2\n  devices: 1\n  stage1:\n    epochs: 3.0\n    lr: 1\n")
    config = load_config(path)
    assert (config.train.unfreeze, config.train.devices) == ("2", "1")
    assert config.train.stage1.epochs == 3 and isinstance(config.train.stage1.epochs, int)
    assert config.train.stage1.lr == 1.0 and isinstance(config.train.stage1.lr, float)


def test_a_saved_config_loads_back_as_it_was(tmp_path):
    """Saved configs (runs, bundles, tune's base.yaml) hold nulls such as stage2.lr: they must load again."""
    config = load_config(overrides={"train.stage1.epochs": 5, "data.image_size": 96})
    assert config_from_dict(config.to_dict()) == config and config.train.stage2.lr is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_values_python_callers_pass_are_taken():
    import numpy as np

    config = load_config(overrides={"model.weights": Path("w.pth"), "train.stage1.epochs": np.int64(3),
                                    "train.stage1.lr": "1e-3", "train.unfreeze": 2})
    assert (config.model.weights, config.train.stage1.epochs, config.train.stage1.lr, config.train.unfreeze) == \
        ("w.pth", 3, 0.001, "2")


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_the_python_api_takes_a_dict_or_a_yaml_path_as_config(tmp_path):
    from effitune.config import as_config

    nested = as_config({"train": {"batch_size": 32}, "data": {"image_size": 64}})
    dotted = as_config({"train.batch_size": 32, "data.image_size": 64})
    assert nested.to_dict() == dotted.to_dict() and nested.train.batch_size == 32
    (tmp_path / "c.yaml").write_text("train:\n  batch_size: 32\ndata:\n  image_size: 64\n")
    assert as_config(tmp_path / "c.yaml").to_dict() == as_config(str(tmp_path / "c.yaml")).to_dict() == nested.to_dict()
    assert as_config(nested) is nested
    with pytest.raises(ConfigError, match="Unknown config key 'train.bach_size'"):
        as_config({"train": {"bach_size": 32}})
    with pytest.raises(ConfigError, match="got list"):
        as_config([("train.batch_size", 32)])


def test_precision_is_checked_with_the_other_keys():
    assert load_config(overrides={"train.precision": "bf16-mixed"}).train.precision == "bf16-mixed"
    with pytest.raises(ConfigError, match="train.precision '9' must be one of auto, 32-true"):
        load_config(overrides={"train.precision": "9"})


def test_hints_for_a_key_one_level_too_high_and_an_unquoted_yes(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'train.epochs'. Did you mean 'train.stage1.epochs' or "
                                          "'train.stage2.epochs'"):
        load_config(overrides={"train.epochs": 5})
    (tmp_path / "c.yaml").write_text("data:\n  balance: yes\n")
    with pytest.raises(ConfigError, match="got True \\(YAML reads yes/no/on/off as true/false"):
        load_config(tmp_path / "c.yaml")
