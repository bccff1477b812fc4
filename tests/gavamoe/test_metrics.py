from __future__ import annotations

import numpy as np
import pytest

from gavamoe.metrics import adjusted_rand_index, mae, rmse


def test_ari_matches_sklearn_and_its_fixed_points():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 300), rng.integers(0, 5, 300)
        b[:150] = a[:150]
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-12)
    a = rng.integers(0, 4, 100)
    assert adjusted_rand_index(a, (a + 1) % 4) == pytest.approx(1.0)  # renaming labels changes nothing


def test_rating_errors():
    assert rmse([1, 2, 3], [1, 2, 5]) == pytest.approx((4 / 3) ** 0.5)
    assert mae([1, 2, 3], [1, 2, 5]) == pytest.approx(2 / 3)


def test_user_majority_ari_votes_once_per_user():
    from gavamoe.metrics import user_majority_ari
    users = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    # user 0 votes 2 (2 of 3), user 1 votes 2, users 2 and 3 vote 0: the same partition as the groups
    clusters = np.array([2, 2, 1, 2, 2, 0, 0, 1, 0])
    assert user_majority_ari(users, clusters, groups) == pytest.approx(1.0)
    clusters = np.array([2, 2, 2, 0, 0, 0, 0, 0, 2])  # users {0, 3} and {1, 2}: independent of the groups
    assert user_majority_ari(users, clusters, groups) == pytest.approx(adjusted_rand_index([2, 0, 0, 2], [0, 0, 1, 1]))
