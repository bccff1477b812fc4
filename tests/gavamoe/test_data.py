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
    with pytest.raises(ValueError, match="--synthetic-groups must be at most"):
        make_synthetic(num_groups=99)


def _nested_laughs(levels: int, width: int):
    node: list = []
    for _ in range(levels):
        node = [node] * width
    return node


@pytest.mark.parametrize(("levels", "width"), [(9, 10), (3, 2000)], ids=["deep", "wide"])
def test_pickle_that_expands_through_shared_references_is_refused_quickly(tmp_path, levels, width):
    """A few hundred bytes (deep) or a few kilobytes (wide) that reach 10^9 objects through shared
    references: refused before anything walks them (load_peter hung on the deep one)."""
    import time

    payload = pickle.dumps(_nested_laughs(levels, width), protocol=4)
    assert len(payload) < 20_000
    (tmp_path / "reviews.pickle").write_bytes(payload)
    start = time.perf_counter()
    with pytest.raises(RefusedPickleError, match="refused"):
        load_peter(tmp_path / "reviews.pickle")
    assert time.perf_counter() - start < 5.0


def test_pickle_larger_than_the_cap_is_refused_unread(tmp_path):
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records()))
    with pytest.raises(RefusedPickleError, match="more than the 100 a reviews pickle is allowed"):
        load_peter(tmp_path / "reviews.pickle", max_bytes=100)


def test_shared_small_tuples_of_an_honest_file_are_accepted(tmp_path):
    template = ("room", "great", "the room was great", 1)  # one tuple object in every record
    records = [{"user": f"u{i}", "item": f"i{i % 3}", "rating": 5, "template": template} for i in range(50)]
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(records))
    assert load_peter(tmp_path / "reviews.pickle").num_users == 50


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rating", 7.0, "rating must be an integer from 1 to 5, got 7.0"),
    ("rating", 0, "rating must be an integer from 1 to 5, got 0"),
    ("rating", float("nan"), "rating must be an integer from 1 to 5, got nan"),
    ("rating", float("inf"), "rating must be an integer from 1 to 5, got inf"),
    ("rating", 3.5, "rating must be an integer from 1 to 5, got 3.5"),
    ("rating", True, "rating must be an integer from 1 to 5, got True"),
    ("rating", "4", "rating must be an integer from 1 to 5, got '4'"),
    ("user", ["u"], "user must be a string or an integer id"),
    ("template", ("f", "a", 3, 1), "the template's sentence must be a string"),
    ("template", ("f", "a", "s", "good"), "the template's sentiment must be a number"),
])
def test_bad_records_are_refused_naming_the_record(tmp_path, field, value, message):
    records = _records()
    records[13][field] = value
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(records))
    with pytest.raises(ValueError, match="record 13: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_peter(tmp_path / "reviews.pickle")


def test_splits_must_be_non_empty_and_disjoint(tmp_path):
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records()))
    (tmp_path / "train.index").write_text(" ".join(map(str, range(14))))
    (tmp_path / "validation.index").write_text("14 15 16")
    (tmp_path / "test.index").write_text("")
    with pytest.raises(ValueError, match="the test split is empty"):
        load_peter(tmp_path / "reviews.pickle", tmp_path)
    (tmp_path / "test.index").write_text("3 17 18")
    with pytest.raises(ValueError, match="record 3 is in both the train and the test split"):
        load_peter(tmp_path / "reviews.pickle", tmp_path)
    (tmp_path / "test.index").write_text("17 x")
    with pytest.raises(ValueError, match="must hold space-separated record positions"):
        load_peter(tmp_path / "reviews.pickle", tmp_path)
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(_records(5)))
    with pytest.raises(ValueError, match="the validation split is empty"):
        load_peter(tmp_path / "reviews.pickle")  # 5 records: 4 train, 0 validation, 1 test
