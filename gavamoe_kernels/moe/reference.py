"""The maths of the cluster-gated MoE layer in plain PyTorch: the ground truth for every backend.

Readable rather than fast; differentiable by autograd; runs in any dtype (tests use float64).

    logits[t]      = gate_weight[cluster_ids[t]] @ hidden[t]                    # [T, E]
    probs[t]       = softmax(logits[t])
    topk_ids[t]    = the k experts of largest probs[t], ties to the lower id     # [T, k]
    topk_weights[t]= probs[t, topk_ids[t]] (/ their sum if normalize)           # [T, k]
    expert_e(x)    = (silu(x @ Wg_e.T) * (x @ Wu_e.T)) @ Wd_e.T,  [Wg_e; Wu_e] = w_gate_up[e]
    y[t]           = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_logits(hidden: torch.Tensor, gate_weight: torch.Tensor, cluster_ids: torch.Tensor) -> torch.Tensor:
    """logits[t, e] = sum_h gate_weight[cluster_ids[t], e, h] * hidden[t, h]; [T, E]."""
    return torch.einsum("teh,th->te", gate_weight[cluster_ids.long()], hidden)


def stable_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, largest first, equal values ordered by lower index."""
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


def route(hidden, gate_weight, cluster_ids, top_k: int = 2, normalize: bool = True):
    """Returns (topk_weights [T,k], topk_ids [T,k] int64, logits [T,E]) in hidden's dtype."""
    logits = route_logits(hidden, gate_weight, cluster_ids)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = stable_topk(probs, top_k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids, logits


def expert(x: torch.Tensor, w_gate_up_e: torch.Tensor, w_down_e: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [n, H], w_gate_up_e [2I, H], w_down_e [H, I] -> [n, H]."""
    gate, up = (x @ w_gate_up_e.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down_e.T


def moe_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down) -> torch.Tensor:
    """y[t] = sum_j topk_weights[t,j] * expert_{topk_ids[t,j]}(hidden[t]); [T, H]."""
    y = torch.zeros_like(hidden)
    weights = topk_weights.to(hidden.dtype)
    for e in range(w_gate_up.shape[0]):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)
        if tokens.numel():
            out = expert(hidden[tokens], w_gate_up[e], w_down[e]) * weights[tokens, slots, None]
            y = y.index_add(0, tokens, out)
    return y


def cluster_gated_moe(hidden, cluster_ids, gate_weight, w_gate_up, w_down, top_k: int = 2, normalize=True):
    weights, ids, _ = route(hidden, gate_weight, cluster_ids, top_k, normalize)
    return moe_experts(hidden, weights, ids, w_gate_up, w_down)


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss  E * sum_e f_e * P_e  (1.0 when perfectly balanced), with
    f_e the fraction of token-slots sent to expert e and P_e the mean of softmax(logits)[:, e]."""
    fraction = F.one_hot(topk_ids.reshape(-1).long(), num_experts).to(logits.dtype).mean(0)
    return num_experts * (fraction * torch.softmax(logits, dim=-1).mean(0)).sum()
