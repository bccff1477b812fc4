"""Full-ranking metrics of next-item prediction, the mutual information of two labelings, and how
sharply FAME's gates choose.

rank = the number of items scored above the target plus the number tied with it (pessimistic:
a model that scores every item alike ranks every target last, not first); no item is excluded
(the history's items stay candidates, as in RecBole's sequential full ranking).
HR@K = [rank < K]; NDCG@K = [rank < K] / log2(rank + 2) (one relevant item: the ideal DCG is 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (n, V) over items 1..V (column j = item j + 1); targets (n,) item ids in 1..V ->
    0-based ranks (n,) int64."""
    low, high = torch.aminmax(scores)  # NaN if any is NaN (one fast pass; isfinite is about 10x slower)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError("scores must be finite: a NaN would rank its target first (a model that diverged?)")
    target = scores.gather(1, (targets - 1).unsqueeze(1))  # [n, 1]
    # the items above the target and those tied with it, but itself (an int32 sum: 3x faster on CPU)
    return torch.ge(scores, target).sum(1, dtype=torch.int32).long() - 1


def ranking_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """hr@k and ndcg@k for each k, averaged over the ranks."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(ranks + 2)).mean())
    return out


def normalized_mutual_information(a, b) -> float:
    """NMI(a, b) = I(a; b) / sqrt(H(a) H(b)) of two integer labelings (0 when either is constant)."""
    a, b = np.asarray(a), np.asarray(b)
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa * np.log(pa)).sum()), -float((pb * np.log(pb)).sum())
    return 0.0 if ha <= 0 or hb <= 0 else mi / math.sqrt(ha * hb)


def normalized_entropy(weights: torch.Tensor) -> torch.Tensor:
    """The entropy of each distribution over the last axis divided by its maximum, ln(size): 1 for
    uniform weights (no choice made), 0 for one-hot ones. A last axis of size 1 gives 0."""
    size = weights.shape[-1]
    if size == 1:
        return torch.zeros(weights.shape[:-1], dtype=weights.dtype)
    p = weights.double()
    return (-(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(size)).to(weights.dtype)


def gate_sharpness(heads: torch.Tensor, experts: torch.Tensor) -> dict:
    """How sharply FAME's gates choose, over n positions: the head gate (n, H) and each head's
    router (n, H, N). For each, the mean normalised entropy (1 = uniform) and the mean largest
    weight (1/size = uniform, 1 = one-hot)."""
    def summary(w: torch.Tensor) -> dict[str, float]:
        return {"entropy": float(normalized_entropy(w).mean()), "max_weight": float(w.max(-1).values.mean())}
    return {"head_gate": summary(heads), "experts": [summary(experts[:, h]) for h in range(experts.shape[1])]}
