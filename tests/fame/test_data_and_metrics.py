"""FAME's data (RecBole .inter, leave-one-out, planted facets) and ranking metrics by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gavamoe.errors import UserInputError
from gavamoe.fame.data import Sequences, Split, leave_one_out, planted_facets, planted_oracle_scores, read_inter
from gavamoe.fame.metrics import (
    gate_sharpness,
    normalized_entropy,
    normalized_mutual_information,
    ranking_metrics,
    target_ranks,
)
from gavamoe.fame.train import oracle, popularity

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
u1\tA\t5\t30
u1\tB\t4\t10
u2\tA\t3\t5
u1\tC\t2\t20
u1\tD\t1\t40
u2\tC\t3\t6
u3\tB\t4\t1
u3\tE\t4\t1
u3\tA\t4\t0
u2\tB\t3\t7
u4\tA\t1\t1
"""


def test_inter_file_orders_by_time_and_splits_leave_one_out(tmp_path):
    path = tmp_path / "toy.inter"
    path.write_text(INTER)
    data = read_inter(path)
    # u4 has one interaction: dropped; ids by first appearance in time order of the kept users
    assert data.users == ["u1", "u2", "u3"] and data.dropped_users == 1
    names = data.item_names
    seqs = [[names[i - 1] for i in s] for s in data.items]
    # u3: A at 0, then B and E tied at 1 keep the file's order
    assert seqs == [["B", "C", "A", "D"], ["A", "C", "B"], ["A", "B", "E"]]
    assert data.num_items == 5
    split = leave_one_out(data, max_len=3)
    item = {name: i + 1 for i, name in enumerate(names)}
    # u1: train sequence B C (input B -> target C), validation B C -> A, test B C A -> D
    assert split["train"].inputs[0].tolist() == [0, 0, item["B"]]
    assert split["train"].targets[0].tolist() == [0, 0, item["C"]]
    assert split["validation"].inputs[0].tolist() == [0, item["B"], item["C"]]
    assert split["validation"].targets.tolist() == [item["A"], item["C"], item["B"]]
    assert split["test"].inputs[0].tolist() == [item["B"], item["C"], item["A"]]
    assert split["test"].targets.tolist() == [item["D"], item["B"], item["E"]]
    # u2 (3 items): no training pair, validation A -> C
    assert split["train"].targets[1].tolist() == [0, 0, 0]
    assert split["validation"].inputs[1].tolist() == [0, 0, item["A"]]
    # max_len cuts to the most recent items
    assert leave_one_out(data, max_len=2)["test"].inputs[0].tolist() == [item["C"], item["A"]]


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty file"),
    ("user_id:token\ttimestamp:float\nu\t1\n", "no item_id column"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\n", ":2: 2 fields, the header has 3"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\tsoon\n", ":2: timestamp 'soon' is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\tnan\n", ":3: timestamp 'nan' is not a finite"),
    ("user_id:token\titem_id:token\nu\ta\n", "no user has 3 or more interactions"),
])
def test_bad_inter_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.inter"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        read_inter(path)


def test_planted_facets_follow_the_users_facet():
    data = planted_facets(300, 120, num_facets=3, values=4, length=15, noise=0.0, seed=1)
    assert len(data) == 300 and all(len(s) == 15 for s in data.items)
    for seq, f in zip(data.items, data.user_facet, strict=True):
        values = {int(data.item_facets[i, f]) for i in seq}
        assert len(values) <= 2  # two liked values on the user's facet, nothing else without noise
    assert planted_facets(50, 40, seed=3).items == planted_facets(50, 40, seed=3).items


def test_planted_facets_record_the_liked_values_the_sequences_follow():
    data = planted_facets(200, 80, num_facets=2, values=5, length=12, noise=0.0, seed=2)
    for seq, f, liked in zip(data.items, data.user_facet, data.user_liked, strict=True):
        assert {int(data.item_facets[i, f]) for i in seq} <= set(liked.tolist()) and liked[0] != liked[1]


def test_the_oracle_ranks_the_current_liked_value_first_by_hand():
    # items 1..6; facet 0 values 0 0 1 1 2 2, facet 1 values 0 1 0 1 0 1 (row 0 is padding)
    facets = np.array([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
    data = Sequences(6, ["a", "b", "c"], [[1], [1], [1]], facets, user_facet=np.array([0, 0, 1]),
                     user_liked=np.array([[0, 2], [0, 2], [0, 1]]), synthetic={"stick": 0.8})
    inputs = torch.tensor([[0, 1, 5, 3],   # user a (facet 0, likes 0 and 2): latest liked value 2 (item 5)
                           [0, 0, 3, 4],   # user b: no input item has a liked value
                           [2, 3, 5, 6]])  # user c (facet 1, likes 0 and 1): latest is item 6, value 1
    split = Split(inputs, torch.tensor([5, 1, 2]), torch.tensor([0, 1, 2]))
    scores = planted_oracle_scores(data, split, torch.Generator().manual_seed(0))
    assert ((scores[[0, 2]] - scores[[0, 2]].floor()) < 0.5).all()  # noise in [0, 1/2) within each class
    assert scores.floor().tolist()[0] == [1, 1, 0, 0, 2, 2]  # value 2 first, value 0 next, value 1 last
    assert (scores * 2).floor().tolist()[1] == [3, 3, 0, 0, 3, 3]  # both liked values alike (1.5)
    assert scores.floor().tolist()[2] == [1, 2, 1, 2, 1, 2]
    data.synthetic["stick"] = 0.3  # the next item more often switches to the other liked value
    assert planted_oracle_scores(data, split, torch.Generator()).floor().tolist()[0] == [2, 2, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="planted data"):
        planted_oracle_scores(Sequences(6, ["a"], [[1]]), split, torch.Generator())


def test_the_oracle_on_the_default_planted_data_far_above_popularity():
    data = planted_facets(seed=0)
    splits = leave_one_out(data)
    ceiling, popular = oracle(data, splits, seed=0)["test"], popularity(data, splits)["test"]
    assert ceiling["ndcg@10"] > 2 * popular["ndcg@10"], (ceiling, popular)  # 0.148 against 0.052


def test_ranks_are_pessimistic_and_metrics_match_hand_values():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target item 3 (score 0.5): rank 1
                           [0.2, 0.2, 0.2, 0.2],    # all tied, target 2: last (rank 3)
                           [0.1, 0.4, 0.3, 0.8]])   # target 4: rank 0
    ranks = target_ranks(scores, torch.tensor([3, 2, 4]))
    assert ranks.tolist() == [1, 3, 0]
    m = ranking_metrics(ranks, ks=(1, 2, 5))
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@2"] == pytest.approx(2 / 3) and m["hr@5"] == 1.0
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5) + 1) / 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_score_is_an_error_not_a_hit(bad):
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    scores[1, 0] = bad  # a NaN target would otherwise rank first
    with pytest.raises(ValueError, match="finite"):
        target_ranks(scores, torch.tensor([3, 1]))


def test_normalized_mutual_information_by_hand():
    assert normalized_mutual_information([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information([0, 0, 0, 0], [0, 1, 0, 1]) == 0.0
    # a = [0,0,1,1,1,1], b = [0,0,0,1,1,1]: I = sum p log p/(pa pb) by hand
    p = {(0, 0): 2 / 6, (1, 0): 1 / 6, (1, 1): 3 / 6}
    pa, pb = {0: 2 / 6, 1: 4 / 6}, {0: 3 / 6, 1: 3 / 6}
    mi = sum(v * math.log(v / (pa[a] * pb[b])) for (a, b), v in p.items())
    ha, hb = -sum(v * math.log(v) for v in pa.values()), -sum(v * math.log(v) for v in pb.values())
    got = normalized_mutual_information([0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1])
    assert got == pytest.approx(mi / math.sqrt(ha * hb))


def test_normalized_entropy_and_gate_sharpness_by_hand():
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert normalized_entropy(weights).tolist() == pytest.approx([1.0, 0.0, math.log(2) / math.log(4)])
    assert normalized_entropy(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]  # one expert: nothing to choose
    heads = torch.tensor([[0.5, 0.5], [0.9, 0.1]])  # 2 positions, 2 heads
    experts = torch.stack([torch.tensor([[1.0, 0.0], [0.5, 0.5]]),  # head 0 at the 2 positions
                           torch.tensor([[0.5, 0.5], [0.5, 0.5]])], dim=1)  # head 1: uniform
    got = gate_sharpness(heads, experts)
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert got["head_gate"] == pytest.approx({"entropy": (1 + h09) / 2, "max_weight": 0.7})
    assert got["experts"] == [pytest.approx({"entropy": 0.5, "max_weight": 0.75}),
                              pytest.approx({"entropy": 1.0, "max_weight": 0.5})]
