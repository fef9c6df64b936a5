"""Arrays in, arrays out: the numpy side of every engine (input layout, batching, probabilities)."""
from __future__ import annotations

import numpy as np


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]: the exported graph's `images` input."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def run_in_batches(engine, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """engine.run over `images` in batches; (logits, features) concatenated."""
    parts = [engine.run(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
