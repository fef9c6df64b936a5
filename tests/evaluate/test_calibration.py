import numpy as np

from effitune.evaluate.calibration import fit_temperature, reliability
from effitune.runtime.batching import softmax


def overconfident(n=4000, classes=5, seed=0):
    """Logits from a known calibrated model (T=1), then scaled x3: overconfident by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 1.5
    probabilities = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits * 3.0, labels


def test_temperature_recovers_the_scale_and_lowers_ece():
    logits, labels = overconfident()
    temperature = fit_temperature(logits, labels)
    assert 2.5 < temperature < 3.5
    before = reliability(softmax(logits), labels)["ece"]
    after = reliability(softmax(logits, temperature), labels)["ece"]
    assert after < before / 2
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()  # no prediction changes


def test_reliability_bins_count_everything():
    logits, labels = overconfident(n=500)
    table = reliability(softmax(logits), labels, bins=10)
    assert sum(b["count"] for b in table["bins"]) == 500
    assert 0 <= table["ece"] <= 1
