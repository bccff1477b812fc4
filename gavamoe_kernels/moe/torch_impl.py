"""The torch backend: what CPU users run, and the backend-neutral layout the kernels share.

Token-slots (t, j) are flattened to s = t * k + j and sorted stably by expert; each expert
then runs one matmul over its contiguous slice, and each token sums its k outputs. Forward
and backward are written out (no autograd inside), so this backend and the Triton one sit
behind the same custom ops and save the same tensors for backward:

    sorted_slots [n]  slot ids ordered by expert (stable), n = T * k
    slot_pos     [n]  inverse: position of slot s in sorted order
    counts       [E]  slots per expert
    h            [n, 2I] pre-activations (gate | up) in sorted order, kept for backward
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import stable_topk


def routing_metadata(topk_ids: torch.Tensor, num_experts: int):
    """(sorted_slots, slot_pos, counts), all int32, from topk_ids [T, k]."""
    flat = topk_ids.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    slot_pos = torch.empty_like(sorted_slots)
    slot_pos[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return sorted_slots.int(), slot_pos.int(), counts.int()


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(logits [T,E] fp32, topk_weights [T,k] fp32, topk_ids [T,k] int64)."""
    C, E, H = gate_weight.shape
    # all C gates in one matmul, then each token keeps its own cluster's row: C is small
    all_logits = (hidden.float() @ gate_weight.reshape(C * E, H).float().T).view(-1, C, E)
    logits = all_logits.gather(1, cluster_ids.long().view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)
    weights, ids = stable_topk(torch.softmax(logits, dim=-1), top_k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.contiguous(), ids.contiguous()  # slices of the sort; contiguous like the fake


def route_logits_grad(d_logits, d_weights, logits, topk_weights, topk_ids, normalize: bool):
    """Gradient reaching the logits (fp32 [T, E]) from d_logits and d topk_weights.

    With s_j = probs[ids_j] and w_j = s_j / S (S = sum s_j) when normalising:
        dL/ds_j = (g_j - sum_i g_i w_i) / S,    else dL/ds_j = g_j
    then through softmax: dl = p * (dp - sum(dp * p)).
    """
    probs = torch.softmax(logits, dim=-1)
    g = d_weights.float()
    if normalize:
        selected = probs.gather(1, topk_ids.long())
        g = (g - (g * topk_weights.float()).sum(-1, keepdim=True)) / selected.sum(-1, keepdim=True)
    d_probs = torch.zeros_like(probs).scatter_add_(1, topk_ids.long(), g)
    d_l = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    return d_l + d_logits.float()


def route_bwd(d_logits, d_weights, hidden, gate_weight, cluster_ids, logits, topk_weights, topk_ids, normalize):
    """(d_hidden [T,H], d_gate_weight [C,E,H]) in the inputs' dtypes."""
    C, E, H = gate_weight.shape
    d_l = route_logits_grad(d_logits, d_weights, logits, topk_weights, topk_ids, normalize)
    cid = cluster_ids.long()
    d_hidden = torch.einsum("te,teh->th", d_l, gate_weight[cid].float())
    # scatter each token's outer product into its cluster: one-hot over C keeps it a matmul
    onehot = F.one_hot(cid, C).float()  # [T, C]
    d_gate = torch.einsum("tc,te,th->ceh", onehot, d_l, hidden.float())
    return d_hidden.to(hidden.dtype), d_gate.to(gate_weight.dtype)


def _per_expert(counts: torch.Tensor, rows: torch.Tensor, fn, out_cols: int) -> torch.Tensor:
    """Concatenate fn(e, rows of expert e) [c_e, out_cols] over experts; rows are in sorted order."""
    pieces = [fn(e, part) for e, part in enumerate(torch.split(rows, counts.tolist())) if part.shape[0]]
    return torch.cat(pieces) if pieces else rows.new_empty((0, out_cols))


def experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward: bool):
    """(y [T,H], h [n,2I] or [0,2I], sorted_slots, slot_pos, counts)."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    sorted_slots, slot_pos, counts = routing_metadata(topk_ids, E)
    x_sorted = hidden[sorted_slots.long() // k]  # [n, H]
    h = _per_expert(counts, x_sorted, lambda e, x: x @ w_gate_up[e].T, two_i)  # [n, 2I]
    gate, up = h.float().chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(hidden.dtype)  # [n, I]
    out = _per_expert(counts, act, lambda e, a: a @ w_down[e].T, H)  # [n, H]
    per_slot = out[slot_pos.long()].view(T, k, H).float()
    y = (per_slot * topk_weights.float().unsqueeze(-1)).sum(1).to(hidden.dtype)
    h_saved = h if save_for_backward else h.new_empty((0, two_i))
    return y, h_saved, sorted_slots, slot_pos, counts


def swiglu_grad(h: torch.Tensor, d_act: torch.Tensor):
    """act = silu(g) * u; returns (act, d_h = [d_g | d_u]) in fp32 from h = [g | u]."""
    gate, up = h.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))
    return silu * up, torch.cat([d_gate, d_act * silu], dim=-1)


def experts_bwd(d_y, hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts):
    """(d_hidden [T,H], d_topk_weights [T,k], d_w_gate_up [E,2I,H], d_w_down [E,H,I])."""
    T, H = hidden.shape
    k = topk_weights.shape[1]
    slots = sorted_slots.long()
    tokens = slots // k
    w_sorted = topk_weights.reshape(-1)[slots].float()  # [n]
    dy_sorted = d_y[tokens]  # [n, H]
    x_sorted = hidden[tokens]
    # d_act' = dy @ Wd_e is the gradient of the unweighted expert output; d_w_s = d_act' . act_s
    d_act_unweighted = _per_expert(counts, dy_sorted, lambda e, g: g @ w_down[e], w_down.shape[2]).float()  # [n, I]
    act, d_h = swiglu_grad(h, d_act_unweighted * w_sorted[:, None])
    d_w = (d_act_unweighted * act).sum(-1)[slot_pos.long()].view(T, k).to(topk_weights.dtype)
    d_h = d_h.to(hidden.dtype)
    act = act.to(hidden.dtype)
    scaled_dy = (dy_sorted.float() * w_sorted[:, None]).to(hidden.dtype)
    d_w_down = torch.zeros_like(w_down)
    d_w_gate_up = torch.zeros_like(w_gate_up)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            rows = slice(start, start + c)
            d_w_down[e] = scaled_dy[rows].T @ act[rows]
            d_w_gate_up[e] = d_h[rows].T @ x_sorted[rows]
            start += c
    d_x_slots = _per_expert(counts, d_h, lambda e, g: g @ w_gate_up[e], H)  # [n, H]
    d_hidden = d_x_slots[slot_pos.long()].view(T, k, H).float().sum(1).to(hidden.dtype)
    return d_hidden, d_w, d_w_gate_up, d_w_down
