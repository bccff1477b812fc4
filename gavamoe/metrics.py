"""Metrics: rating errors and clustering agreement."""

from __future__ import annotations

import math

import numpy as np


def rmse(predicted, target) -> float:
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else math.nan


def mae(predicted, target) -> float:
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return float(np.mean(np.abs(p - t))) if p.size else math.nan


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions, about 0 for
    independent ones; invariant to renaming the labels."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in shape: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = lambda x: (x * (x - 1) // 2).sum()
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) // 2)
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))
