"""Nearest neighbours in feature space, linear in the number of images: near duplicates and kNN distances.

Up to `EXACT_LIMIT` rows every pair is compared (blocked products, no n x n matrix). Above it an
inverted-file index of faiss (a well-kept library) proposes each row's `CANDIDATES` nearest rows
at a cost per row that does not grow with n, and their exact similarities are computed: O(n d)
instead of the O(n^2 d) that made the report's audit 28 minutes at 320k images on 2 cores
(docs/benchmarks.md, "Scale"). What the index can miss are neighbours it does not propose, which
for near duplicates (cosine >= 0.97) almost never happens. On a GPU the exact blocked search runs
there in torch instead: 320k x 320k products are seconds on the device.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import EffituneWarning

EXACT_LIMIT = 8192  # rows up to which every pair is compared on a CPU
NPROBE = 8  # cells of the index each row looks in
CELL_ROWS = 100  # rows per cell of the index: a row's search costs the same at any n
INDEX_DIMS = 64  # principal directions the index searches on (candidates are re-scored on all)
CANDIDATES = 16  # nearest rows each row re-scores: near-duplicate groups larger than this are undercounted
_BLOCK = 2048  # rows compared at once by the exact search (memory: block x n)
_RESCORE_BLOCK = 2048  # rows re-scored at once (memory: block x CANDIDATES x d)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Centred, L2-normalised float32 rows: pooled activations share a large common component that
    makes any two images look alike until it is removed."""
    unit = features.astype(np.float32) - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(unit)


def neighbours(features: np.ndarray, threshold: float, k: int, max_pairs: int,
               device: str = "cpu") -> tuple[list[tuple[int, int, float]], int, np.ndarray]:
    """(pairs i<j with cosine similarity >= threshold, most similar first, at most `max_pairs`; their
    total count; each row's mean cosine distance to its k nearest other rows)."""
    n = len(features)
    if n < 2:
        return [], 0, np.zeros(n)
    unit = unit_rows(features)
    k = max(1, min(k, n - 1))
    if str(device).startswith("cuda"):
        blocks = _exact_torch(unit, threshold, k, device)
    elif n <= EXACT_LIMIT or not _has_faiss():
        blocks = _exact_numpy(unit, threshold, k)
    else:
        blocks = _indexed(unit, threshold, k)
    return _collect(blocks, n, max_pairs)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        warnings.warn("faiss is not installed: the neighbour search compares every pair of images, which grows "
                      "with the square of their number. `pip install faiss-cpu` makes it linear.", EffituneWarning,
                      stacklevel=3)
        return False
    return True


def _collect(blocks, n: int, max_pairs: int) -> tuple[list[tuple[int, int, float]], int, np.ndarray]:
    """Merge per-block results: (start, kNN distances, i, j, similarity) with i < j as global indices."""
    knn = np.zeros(n, dtype=np.float64)
    kept: list[np.ndarray] = []
    total = 0
    for start, distances, i, j, similarity in blocks:
        knn[start:start + len(distances)] = distances
        total += len(i)
        if len(i):
            kept.append(np.stack([i, j, similarity], axis=1).astype(np.float64))
            if sum(len(part) for part in kept) > 2 * max_pairs:
                kept = [_most_similar(np.concatenate(kept), max_pairs)]
    merged = _most_similar(np.concatenate(kept), max_pairs) if kept else np.zeros((0, 3))
    return [(int(a), int(b), float(s)) for a, b, s in merged], total, knn


def _most_similar(pairs: np.ndarray, limit: int) -> np.ndarray:
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -pairs[:, 2]))
    return pairs[order[:limit]]


def _pairs_above(block: np.ndarray, start: int, threshold: float):
    i, j = np.nonzero(block >= threshold)
    keep = j > i + start
    return i[keep] + start, j[keep], block[i[keep], j[keep]]


def _exact_numpy(unit: np.ndarray, threshold: float, k: int):
    for start in range(0, len(unit), _BLOCK):
        block = unit[start:start + _BLOCK] @ unit.T
        rows = np.arange(len(block))
        block[rows, rows + start] = -np.inf  # never one's own neighbour
        nearest = -np.partition(-block, k - 1, axis=1)[:, :k]
        yield (start, 1.0 - nearest.mean(axis=1), *_pairs_above(block, start, threshold))


def _exact_torch(unit: np.ndarray, threshold: float, k: int, device: str):
    """The exact search as blocked top-k on the device (float32 products: similarities to ~1e-6)."""
    import torch

    on_device = torch.from_numpy(unit).to(device)
    for start in range(0, len(unit), _BLOCK):
        block = on_device[start:start + _BLOCK] @ on_device.T
        rows = torch.arange(len(block), device=block.device)
        block[rows, rows + start] = -math.inf
        nearest = block.topk(k, dim=1).values
        i, j = torch.nonzero(block >= threshold, as_tuple=True)
        keep = j > i + start
        i, j = i[keep], j[keep]
        similarity = block[i, j]
        yield (start, (1.0 - nearest.mean(dim=1)).double().cpu().numpy(), (i + start).cpu().numpy(),
               j.cpu().numpy(), similarity.cpu().numpy())


def _indexed(unit: np.ndarray, threshold: float, k: int):
    """Candidates from a faiss index on the leading principal directions, re-scored on every dimension.

    Each row's `CANDIDATES` nearest come from an inverted file over `INDEX_DIMS` PCA dimensions with
    about `CELL_ROWS` rows per cell (an HNSW graph finds the cells), so a row costs the same at any n.
    Their exact cosine similarities then give the k nearest and the near-duplicate pairs.
    """
    import faiss

    n, d = unit.shape
    rng = np.random.default_rng(0)
    reduced = _reduce(unit, rng)
    cells = max(1, n // CELL_ROWS)
    quantizer = faiss.IndexHNSWFlat(reduced.shape[1], 32, faiss.METRIC_INNER_PRODUCT) if cells > 1024 \
        else faiss.IndexFlatIP(reduced.shape[1])
    index = faiss.IndexIVFFlat(quantizer, reduced.shape[1], cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 5  # k-means on a sample of 30 rows per cell is enough to bucket
    sample = rng.choice(n, size=min(n, 30 * cells), replace=False)
    index.train(reduced[np.sort(sample)])
    index.add(reduced)
    index.nprobe = min(NPROBE, cells)
    wanted = min(n, max(k + 1, CANDIDATES))
    _, ids = index.search(reduced, wanted)  # n x CANDIDATES row numbers: linear memory
    rows = np.arange(n)
    ids = np.where(ids < 0, rows[:, None], ids)  # fewer rows than asked in the probed cells
    for start in range(0, n, _RESCORE_BLOCK):
        own = rows[start:start + _RESCORE_BLOCK]
        found = ids[own]
        similarity = np.einsum("qd,qcd->qc", unit[own], unit[found])  # exact, on every dimension
        similarity[found == own[:, None]] = -np.inf  # never one's own neighbour
        nearest = -np.sort(-similarity, axis=1)[:, :k]
        nearest = np.where(np.isfinite(nearest), nearest, -1.0)  # an isolated row: as far as can be
        q, c = np.nonzero(similarity >= threshold)
        i, j = own[q], found[q, c]
        # a pair proposed from both sides counts once: from the lower row's side
        once = (i < j) | ~(ids[j] == i[:, None]).any(axis=1)
        a, b = np.minimum(i, j)[once], np.maximum(i, j)[once]
        yield start, 1.0 - nearest.mean(axis=1), a, b, similarity[q, c][once]


def _reduce(unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rows on their leading `INDEX_DIMS` principal directions (fitted on a sample), unit length again."""
    if unit.shape[1] <= INDEX_DIMS:
        return unit
    sample = unit[np.sort(rng.choice(len(unit), size=min(len(unit), 20_000), replace=False))]
    sample = sample - sample.mean(0)
    _, vectors = np.linalg.eigh(sample.T @ sample)  # ascending eigenvalues: the last are the leading
    directions = np.ascontiguousarray(vectors[:, -INDEX_DIMS:], dtype=np.float32)
    reduced = np.empty((len(unit), INDEX_DIMS), np.float32)
    for start in range(0, len(unit), 65536):
        reduced[start:start + 65536] = unit[start:start + 65536] @ directions
    reduced /= np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
    return reduced
