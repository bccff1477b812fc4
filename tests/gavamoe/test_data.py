"""The PETER loader (restricted unpickling, splits, id maps) and the synthetic generator."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from gavamoe.data import RefusedPickleError, load_peter, make_synthetic


def _records(n=20):
    return [{"user": f"u{i % 5}", "item": f"i{i % 7}", "rating": float(1 + i % 5),
             "template": (f"feat{i % 3}", "good", f"the feat{i % 3} is good", 1)} for i in range(n)]


def test_load_peter_with_index_dir(tmp_path):
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records()))
    (tmp_path / "train.index").write_text(" ".join(map(str, range(14))))
    (tmp_path / "validation.index").write_text("14 15 16")
    (tmp_path / "test.index").write_text("17 18 19")
    data = load_peter(tmp_path / "reviews.pickle", tmp_path)
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [14, 3, 3]
    assert data.num_users == 5 and data.num_items == 7 and data.features == ["feat0", "feat1", "feat2"]
    assert data.user_train_freq.sum() == 14 and data.user_train_freq[data.records[0]["user_idx"]] == 3
    t = data.tensors("test")
    assert t["user"].tolist() == [data.records[i]["user_idx"] for i in (17, 18, 19)] and "group" not in t


def test_load_peter_without_index_is_a_seeded_8_1_1_split(tmp_path):
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records(100)))
    a, b = load_peter(tmp_path / "reviews.pickle"), load_peter(tmp_path / "reviews.pickle")
    assert [len(a.splits[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert all(np.array_equal(a.splits[s], b.splits[s]) for s in a.splits)
    assert sorted(np.concatenate(list(a.splits.values())).tolist()) == list(range(100))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))  # would create the file if unpickled normally


def test_restricted_unpickler_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps([{"user": _Exploit(marker)}]))
    with pytest.raises(RefusedPickleError, match=r"refused to load io\.open"):
        load_peter(tmp_path / "reviews.pickle")
    assert not marker.exists()


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="must hold a list of review dicts"):
        load_peter(tmp_path / "reviews.pickle")
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps([{"user": "u", "item": "i", "rating": 3.0}]))
    with pytest.raises(ValueError, match="record 0 must be a dict with keys"):
        load_peter(tmp_path / "reviews.pickle")
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records()))
    with pytest.raises(ValueError, match=r"lacks train\.index"):
        load_peter(tmp_path / "reviews.pickle", tmp_path)


def test_synthetic_is_seeded_and_carries_groups():
    a = make_synthetic(num_users=50, num_items=40, num_records=500, num_groups=3, seed=4)
    b = make_synthetic(num_users=50, num_items=40, num_records=500, num_groups=3, seed=4)
    assert [r["rating"] for r in a.records] == [r["rating"] for r in b.records]
    assert a.has_groups and {r["group"] for r in a.records} == {0, 1, 2}
    r = a.records[0]
    feature, adjective, sentence, sentiment = r["template"]
    assert feature in sentence and adjective in sentence and sentiment in (1, -1)
    assert 1 <= r["rating"] <= 5
    # each user keeps one group
    groups = {}
    for rec in a.records:
        assert groups.setdefault(rec["user"], rec["group"]) == rec["group"]
    with pytest.raises(ValueError, match="num_groups must be at most"):
        make_synthetic(num_groups=99)
