"""Memorisation check of a generative model: how close is each sample to its nearest training image?

A model that copies its training set makes samples far closer to some training image than fresh images of the
same population are. The reference is therefore the held-out TEST set: each test image's cosine similarity to its
nearest training image gives the distribution a new, non-copied image has; a generated sample whose nearest-training
similarity exceeds that distribution's 95th (99th) percentile is suspicious. Without memorisation about 5 % (1 %)
of the samples exceed it, as of the test images themselves; a copying model pushes the fraction towards 1.

Similarities are cosines of feature vectors: embeddings ``(N, D)`` (e.g. of the FID feature network, the better
choice) or images ``(N, ...)``, flattened. On raw pixels every brain resembles every other (cosines near 1);
``center=True`` subtracts the training set's mean vector first, so the cosine compares deviations from the mean
image. Every similarity comes from batched matrix products over chunks of queries and references, so memory
stays at ``chunk_size ** 2`` similarities whatever the set sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["memorisation_report", "nearest_neighbour_similarity", "nearest_neighbours"]

ArrayLike = torch.Tensor | np.ndarray


def _as_matrix(values: ArrayLike, name: str) -> torch.Tensor:
    """``(N, D)`` embeddings, or ``(N, ...)`` images flattened, as a float64 CPU tensor."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
        dtype, numeric = tensor.dtype, tensor.dtype != torch.bool and not tensor.is_complex()
    else:
        array = np.asarray(values)
        dtype, numeric = array.dtype, np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        tensor = torch.from_numpy(np.array(array, dtype=np.float64)) if numeric else None
    if not numeric:
        raise ValueError(f"`{name}` must be real numbers, got dtype {dtype}.")
    if tensor.ndim < 2:
        raise ValueError(f"`{name}` must be (N, D) embeddings or (N, ...) images, got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] == 0 or tensor[0].numel() == 0:
        raise ValueError(f"`{name}` is empty: {tuple(tensor.shape)}.")
    matrix = tensor.reshape(tensor.shape[0], -1).to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return matrix


def _unit_rows(matrix: torch.Tensor, name: str) -> torch.Tensor:
    norms = matrix.norm(dim=1, keepdim=True)
    zero = torch.nonzero(norms[:, 0] <= 1e-12).flatten().tolist()
    if zero:
        raise ValueError(f"`{name}` rows {zero[:10]} have zero norm (after centring): their cosine is undefined.")
    return matrix / norms


def _prepare(sets: dict[str, ArrayLike], center: bool, reference: str) -> dict[str, torch.Tensor]:
    """Validated, (optionally) centred on ``reference``'s mean, row-normalised matrices of a common width."""
    matrices = {name: _as_matrix(values, name) for name, values in sets.items()}
    widths = {name: m.shape[1] for name, m in matrices.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"The sets must have the same feature size, got {widths}.")
    if center:
        mean = matrices[reference].mean(dim=0, keepdim=True)
        matrices = {name: m - mean for name, m in matrices.items()}
    return {name: _unit_rows(m, name) for name, m in matrices.items()}


def _max_cosine(queries: torch.Tensor, references: torch.Tensor, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest cosine of each (unit) query row over the (unit) reference rows, and its reference index."""
    best = torch.full((queries.shape[0],), -math.inf, dtype=torch.float64)
    index = torch.zeros(queries.shape[0], dtype=torch.int64)
    for q0 in range(0, queries.shape[0], chunk_size):
        q = queries[q0 : q0 + chunk_size]
        for r0 in range(0, references.shape[0], chunk_size):
            value, where = (q @ references[r0 : r0 + chunk_size].T).max(dim=1)
            better = value > best[q0 : q0 + chunk_size]
            best[q0 : q0 + chunk_size] = torch.where(better, value, best[q0 : q0 + chunk_size])
            index[q0 : q0 + chunk_size] = torch.where(better, where + r0, index[q0 : q0 + chunk_size])
    return best.clamp(-1.0, 1.0).numpy(), index.numpy()


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    return int(chunk_size)


def nearest_neighbours(
    queries: ArrayLike, references: ArrayLike, center: bool = False, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity ``(N,)`` of each query to its nearest reference, and that reference's index ``(N,)``.

    ``queries`` ``(N, D)`` / ``references`` ``(M, D)`` embeddings, or image batches ``(N, ...)`` of equal size,
    flattened (numpy or torch). ``center=True`` subtracts the references' mean vector from both sets first. Ties
    go to the lowest reference index. Raises ``ValueError`` for empty sets, different feature sizes, non-finite
    values or a zero vector (its cosine is undefined).
    """
    chunk_size = _check_chunk(chunk_size)
    unit = _prepare({"queries": queries, "references": references}, center, "references")
    return _max_cosine(unit["queries"], unit["references"], chunk_size)


def nearest_neighbour_similarity(
    queries: ArrayLike, references: ArrayLike, center: bool = False, chunk_size: int = 1024
) -> np.ndarray:
    """Largest cosine similarity ``(N,)`` of each query to the references (see :func:`nearest_neighbours`)."""
    return nearest_neighbours(queries, references, center, chunk_size)[0]


def _summary(similarity: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(similarity)),
        "p95": float(np.percentile(similarity, 95)),
        "p99": float(np.percentile(similarity, 99)),
        "max": float(similarity.max()),
    }


def memorisation_report(
    generated_emb: ArrayLike,
    train_emb: ArrayLike,
    test_emb: ArrayLike,
    top_k: int = 8,
    center: bool = False,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Nearest-training similarity of generated samples against that of real test images (the reference).

    ``generated_emb`` ``(N, D)``, ``train_emb`` ``(M, D)``, ``test_emb`` ``(T, D)``: embeddings (or image batches,
    flattened) of the same kind. ``center=True`` centres all three on the training mean. Returned
    (JSON-serialisable):

    * ``generated`` and ``test``: ``median``, ``p95``, ``p99``, ``max`` of the nearest-training cosine of each
      generated sample / each test image (percentiles as ``numpy.percentile``, linear);
    * ``fraction_above_test_p95`` / ``fraction_above_test_p99``: share of generated samples whose similarity is
      strictly above the test set's 95th / 99th percentile (about 0.05 / 0.01 without memorisation; the test
      images' own shares are ``test_fraction_above_p95`` / ``_p99``, which differ from 0.05 / 0.01 only by
      percentile interpolation). The 99th percentile of fewer than 100 test images is little more than their
      maximum;
    * ``top_k``: the ``min(top_k, N)`` generated samples most similar to a training image, most similar first,
      each ``{"index", "similarity", "train_index"}`` (for a figure of sample beside neighbour);
    * ``generated_similarity``, ``generated_train_index``, ``test_similarity``: per-sample values, in input order;
    * ``num_generated``, ``num_train``, ``num_test``, ``center``.
    """
    if int(top_k) < 0:
        raise ValueError(f"`top_k` must be >= 0, got {top_k}.")
    chunk_size = _check_chunk(chunk_size)
    unit = _prepare({"generated_emb": generated_emb, "train_emb": train_emb, "test_emb": test_emb}, center, "train_emb")
    generated, train_index = _max_cosine(unit["generated_emb"], unit["train_emb"], chunk_size)
    test, _ = _max_cosine(unit["test_emb"], unit["train_emb"], chunk_size)
    p95, p99 = (float(np.percentile(test, q)) for q in (95, 99))
    order = np.argsort(-generated, kind="stable")[: int(top_k)]
    return {
        "num_generated": int(generated.size),
        "num_train": int(unit["train_emb"].shape[0]),
        "num_test": int(test.size),
        "center": bool(center),
        "generated": _summary(generated),
        "test": _summary(test),
        "fraction_above_test_p95": float(np.mean(generated > p95)),
        "fraction_above_test_p99": float(np.mean(generated > p99)),
        "test_fraction_above_p95": float(np.mean(test > p95)),
        "test_fraction_above_p99": float(np.mean(test > p99)),
        "top_k": [
            {"index": int(i), "similarity": float(generated[i]), "train_index": int(train_index[i])} for i in order
        ],
        "generated_similarity": generated.tolist(),
        "generated_train_index": train_index.tolist(),
        "test_similarity": test.tolist(),
    }
