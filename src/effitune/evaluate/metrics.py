"""Classification metrics from predicted probabilities, computed with scikit-learn."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else float("nan")


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, top-k, macro/weighted P/R/F1, per-class table and confusion matrix (JSON-ready).

    Macro averages are over the classes the images have (a class of the model with no image here has
    no recall to average; counting it as 0 would understate every score of a subset).
    """
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0)
    present = [i for i in indices if support[i]] or indices
    summary = {}
    for average, over in (("macro", present), ("weighted", indices)):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=over, average=average,
                                                     zero_division=0)
        summary[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "top_k": {str(k): top_k_accuracy(probabilities, labels, k) for k in (1, 3, 5) if k <= len(classes)},
        **summary,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }
