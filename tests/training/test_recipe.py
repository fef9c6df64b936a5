"""The recipe sized to the hardware: the CPU keeps its ladder, a GPU with data fine-tunes everything,
and a time budget is judged on the predicted cost of the next phase (measured costs stood in)."""
import time

from effitune.config import Config
from effitune.training import recipe
from effitune.training.run import _should_stop_deeper, fill_epochs
from effitune.training.stages import Phase

LITE0_STAGES = 7


def test_a_cpu_climbs_the_ladder_to_three_stages_whatever_the_data():
    for n_train in (500, 4_199, 42_000, 300_000):
        assert recipe.auto_depths("auto", None, LITE0_STAGES, "cpu", n_train) == [1, 2, 3]
        assert recipe.train_bn(None, 3, n_train) is False  # BatchNorm stays frozen on the ladder


def test_a_gpu_with_data_enough_fine_tunes_every_layer_with_batchnorm():
    assert recipe.auto_depths("auto", None, LITE0_STAGES, "cuda", 42_000) == [-1]
    assert recipe.train_bn(None, -1, 42_000) is True
    config = Config()
    fill_epochs(config, 42_000, [-1])
    assert config.train.stage2.epochs == recipe.FULL_FINETUNE_EPOCHS and config.train.stage1.epochs == 8


def test_a_gpu_with_little_data_goes_as_deep_as_the_network_with_frozen_batchnorm():
    depths = recipe.auto_depths("auto", None, LITE0_STAGES, "cuda", 2_000)
    assert depths == [1, 2, 3, 4, 5, 6, -1]
    assert recipe.train_bn(None, -1, 2_000) is False


def test_explicit_settings_win():
    assert recipe.auto_depths("auto", 2, LITE0_STAGES, "cuda", 42_000) == [1, 2]
    assert recipe.auto_depths("2", None, LITE0_STAGES, "cuda", 42_000) == [2]
    assert recipe.train_bn(False, -1, 42_000) is False and recipe.train_bn(True, 1, 100) is True
    config = Config()
    config.train.stage2.epochs = 4
    fill_epochs(config, 42_000, [-1])
    assert config.train.stage2.epochs == 4


def test_small_images_train_larger_on_a_gpu():
    assert recipe.small_image_size(28, 224, "cpu") == 96  # the demo's size: CPU figures unchanged
    assert recipe.small_image_size(28, 224, "cuda") == 128  # the plain loop's 0.951 size
    assert recipe.small_image_size(200, 224, "cuda") == 224


def test_the_next_phase_cost_is_predicted_from_the_measured_ones():
    assert recipe.predicted_seconds([]) is None
    assert recipe.predicted_seconds([40.0]) == 80.0
    assert recipe.predicted_seconds([40.0, 80.0]) == 160.0  # grew 2x: grows 2x again
    assert recipe.predicted_seconds([80.0, 40.0]) == 40.0  # never predicted cheaper than the last
    assert recipe.predicted_seconds([10.0, 100.0]) == 300.0  # growth capped at 3x


def _state(**phases):
    done = {"stage1": {"val_acc": 0.80, "seconds": 5.0}}
    done.update({f"stage2-depth{k[1:]}": {"val_acc": acc, "seconds": sec} for k, (acc, sec) in phases.items()})
    return {"done": done, "best": max(done, key=lambda k: done[k]["val_acc"])}


def test_a_deeper_phase_starts_only_if_its_predicted_cost_fits_the_budget():
    """Depths 1 and 2 took 40 s and 80 s (the demo's CPU ladder): depth 3 is predicted at 160 s."""
    config = Config()
    config.train.time_budget_min = 5.0
    state = _state(d1=(0.85, 40.0), d2=(0.87, 80.0))
    two_minutes_ago = time.perf_counter() - 120
    assert not _should_stop_deeper(Phase(3), state, config, two_minutes_ago)  # 120 + 160 s < 300 s
    three_minutes_ago = time.perf_counter() - 180
    assert _should_stop_deeper(Phase(3), state, config, three_minutes_ago)  # 180 + 160 s > 300 s: not started
    config.train.time_budget_min = None
    assert not _should_stop_deeper(Phase(3), state, config, three_minutes_ago - 3600)


def test_the_ladder_stops_before_all_layers_when_deeper_stopped_paying():
    config = Config()
    state = _state(d1=(0.85, 1.0), d2=(0.84, 1.0), d3=(0.84, 1.0))
    assert _should_stop_deeper(Phase(-1), state, config, time.perf_counter())
