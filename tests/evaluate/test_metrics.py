import numpy as np

from effitune.evaluate.metrics import classification_metrics


def test_macro_averages_only_the_classes_the_images_have():
    """Evaluating on a subset: the model's third class has no image, so no recall to average."""
    labels = np.array([0, 0, 1, 1, 1])
    probabilities = np.eye(3)[[0, 1, 1, 1, 1]]  # one 'a' taken for 'b'
    metrics = classification_metrics(probabilities, labels, ["a", "b", "c"])
    assert metrics["per_class"]["c"]["support"] == 0
    assert metrics["macro"]["recall"] == (0.5 + 1.0) / 2
    assert metrics["accuracy"] == 0.8 and len(metrics["confusion"]) == 3
