"""The indexed neighbour search agrees with the exact one; the device path gives the same answers."""
import numpy as np
import pytest

from effitune.evaluate import neighbours as nearest


def _clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    features = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))
    for i in range(0, 200, 2):  # planted near duplicates: a row and a slightly noisy copy of it
        features[n - 1 - i] = features[i] + 0.01 * rng.normal(size=d)
    return features.astype(np.float32)


def test_index_finds_the_planted_duplicates_and_the_exact_knn(monkeypatch):
    features = _clustered(3000)
    exact_pairs, exact_total, exact_knn = nearest.neighbours(features, 0.97, 5, 10_000)
    monkeypatch.setattr(nearest, "EXACT_LIMIT", 100)  # force the faiss index
    pairs, total, knn = nearest.neighbours(features, 0.97, 5, 10_000)
    assert exact_total >= 100
    found = {(a, b) for a, b, _ in pairs}
    planted = {(i, 2999 - i) for i in range(0, 200, 2)}
    assert planted <= found  # every planted pair, among what the exact search gives
    assert found <= {(a, b) for a, b, _ in exact_pairs}
    assert total >= 0.98 * exact_total
    similarity = {(a, b): s for a, b, s in exact_pairs}
    assert all(abs(similarity[(a, b)] - s) < 1e-4 for a, b, s in pairs)  # exact inner products
    # kNN distances: the same for almost every row, never below the exact one (it can only miss neighbours)
    assert np.mean(np.abs(knn - exact_knn) < 1e-4) > 0.9
    assert np.all(knn >= exact_knn - 1e-4)
    # and the outlier order they drive: the same top rows
    assert len(set(np.argsort(-knn)[:20]) & set(np.argsort(-exact_knn)[:20])) >= 18


def test_pairs_are_capped_but_counted(monkeypatch):
    features = _clustered(1000)
    monkeypatch.setattr(nearest, "EXACT_LIMIT", 100)
    pairs, total, _ = nearest.neighbours(features, 0.97, 5, max_pairs=10)
    assert len(pairs) == 10 and total >= 100
    assert [s for _, _, s in pairs] == sorted((s for _, _, s in pairs), reverse=True)


def test_the_device_search_matches_numpy():
    """The GPU path is torch's blocked top-k; run here on the CPU's torch, it must equal numpy's."""
    features = _clustered(700)
    unit = nearest.unit_rows(features)
    expected = nearest._collect(nearest._exact_numpy(unit, 0.97, 5), len(unit), 10_000)
    got = nearest._collect(nearest._exact_torch(unit, 0.97, 5, "cpu"), len(unit), 10_000)
    # the same pairs with the same similarities; near-equal similarities may sort either way
    # (numpy's and torch's matmuls round differently in the last bit)
    assert {p[:2] for p in got[0]} == {p[:2] for p in expected[0]} and got[1] == expected[1]
    similarity = {(a, b): s for a, b, s in expected[0]}
    assert all(abs(similarity[(a, b)] - s) < 1e-5 for a, b, s in got[0])
    np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(n):
    pairs, total, knn = nearest.neighbours(np.ones((n, 4), np.float32), 0.5, 5, 10)
    assert len(knn) == n and total == len(pairs)
