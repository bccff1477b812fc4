"""The torch backend: what CPU users run, and the backend-neutral layout the kernels share.

Token-slots (t, j) are flattened to s = t * k + j and sorted stably by expert; each expert
then runs one matmul over its contiguous slice, and each token sums its k outputs. Forward
and backward are written out (no autograd inside), so this backend and the Triton one sit
behind the same custom ops and save the same tensors for backward (interface.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import MoEBackend


def routing_metadata(topk_ids: torch.Tensor, num_experts: int):
    """(sorted_slots, slot_pos, counts), all int32, from topk_ids [T, k]."""
    flat = topk_ids.reshape(-1).long()
    sorted_slots = torch.argsort(flat, stable=True)
    slot_pos = torch.empty_like(sorted_slots)
    slot_pos[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return sorted_slots.int(), slot_pos.int(), counts.int()


def _stable_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, largest first, equal values ordered by lower index."""
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32)."""
    C, E, H = gate_weight.shape
    # all C gates in one matmul, then each token keeps its own cluster's row: C is small
    all_logits = (hidden.float() @ gate_weight.reshape(C * E, H).float().T).view(-1, C, E)
    logits = all_logits.gather(1, cluster_ids.long().view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)
    weights, ids = _stable_topk(torch.softmax(logits, dim=-1), top_k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.contiguous(), ids.contiguous(), logits  # slices of the sort; contiguous like the fake


def route_logits_grad(d_weights, d_logits, logits, topk_weights, topk_ids, normalize: bool):
    """Gradient reaching the logits (fp32 [T, E]) from d topk_weights and d logits.

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


def route_bwd(d_weights, d_logits, hidden, gate_weight, cluster_ids, topk_weights, topk_ids, logits, normalize):
    """(d_hidden [T,H], d_gate_weight [C,E,H]) in the inputs' dtypes."""
    C, E, H = gate_weight.shape
    d_l = route_logits_grad(d_weights, d_logits, logits, topk_weights, topk_ids, normalize)
    # each token's d_logits in its own cluster's block of a [T, C*E] matrix, zeros elsewhere:
    # both gradients are then one matmul against all C gates, as in the forward (no per-token
    # copy of the gate)
    wide = (F.one_hot(cluster_ids.long(), C).float()[:, :, None] * d_l[:, None, :]).reshape(-1, C * E)
    d_hidden = wide @ gate_weight.reshape(C * E, H).float()
    d_gate = (wide.T @ hidden.float()).view(C, E, H)
    return d_hidden.to(hidden.dtype), d_gate.to(gate_weight.dtype)


def _expert_slices(counts: torch.Tensor):
    """(expert, slice of its sorted rows) for every expert with rows; one host read of counts."""
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            yield e, slice(start, start + c)
            start += c


def _combine(per_slot: torch.Tensor, slot_pos: torch.Tensor, weights: torch.Tensor, T: int, k: int):
    """y[t] = sum_j weights[t, j] * per_slot[pos(t, j)] in fp32, as one batched matmul."""
    rows = per_slot[slot_pos.long()].view(T, k, per_slot.shape[1]).float()
    return torch.bmm(weights.float().view(T, 1, k), rows).view(T, per_slot.shape[1])


def _swiglu(pre_act: torch.Tensor) -> torch.Tensor:
    """act = silu(g) * u from pre_act = [g | u], computed in fp32, returned in pre_act's dtype."""
    gate, up = pre_act.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(pre_act.dtype)


def _swiglu_grad(pre_act: torch.Tensor, d_act: torch.Tensor):
    """act = silu(g) * u; returns (act, d_pre = [d_g | d_u]) in fp32 from pre_act = [g | u]."""
    gate, up = pre_act.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))
    return silu * up, torch.cat([d_gate, d_act * silu], dim=-1)


def experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward: bool):
    """(y [T,H], pre_act [n,2I] or [0,2I], sorted_slots, slot_pos, counts).

    Each expert runs up-projection, SwiGLU and down-projection on its slice while the slice is
    in cache, writing into preallocated outputs."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    sorted_slots, slot_pos, counts = routing_metadata(topk_ids, E)
    tokens = sorted_slots.long() // k
    out = hidden.new_empty((T * k, H))  # [n, H] expert outputs in sorted order
    pre_act = hidden.new_empty((T * k if save_for_backward else 0, two_i))
    for e, rows in _expert_slices(counts):
        pre_e = hidden[tokens[rows]] @ w_gate_up[e].T  # [c, 2I]
        if save_for_backward:
            pre_act[rows] = pre_e
        torch.matmul(_swiglu(pre_e), w_down[e].T, out=out[rows])
    y = _combine(out, slot_pos, topk_weights, T, k).to(hidden.dtype)
    return y, pre_act, sorted_slots, slot_pos, counts


def experts_bwd(d_y, hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts):
    """(d_hidden [T,H], d_topk_weights [T,k], d_w_gate_up [E,2I,H], d_w_down [E,H,I]).

    Per expert, with d_act' = d_y @ Wd_e the gradient of the unweighted expert output:
    d_w = d_act' . act,  d_pre = dSwiGLU(w * d_act'),  dWd_e = d_y^T (w act),  dWgu_e = d_pre^T x,
    and each slot's d_x = d_pre @ Wgu_e, summed per token."""
    T, H = hidden.shape
    k = topk_weights.shape[1]
    tokens = sorted_slots.long() // k
    w_sorted = topk_weights.reshape(-1)[sorted_slots.long()].float()  # [n]
    d_w_sorted = torch.zeros(T * k, device=hidden.device, dtype=torch.float32)
    d_x_slots = hidden.new_empty((T * k, H))
    d_w_down = torch.zeros(w_down.shape, device=hidden.device, dtype=hidden.dtype)
    d_w_gate_up = torch.zeros(w_gate_up.shape, device=hidden.device, dtype=hidden.dtype)
    for e, rows in _expert_slices(counts):
        x_e, dy_e, w_e = hidden[tokens[rows]], d_y[tokens[rows]].to(hidden.dtype), w_sorted[rows, None]
        d_act = (dy_e @ w_down[e]).float()  # [c, I]
        act, d_pre = _swiglu_grad(pre_act[rows], d_act * w_e)
        d_w_sorted[rows] = (d_act * act).sum(-1)
        d_w_down[e] = dy_e.T @ (act * w_e).to(hidden.dtype)
        d_w_gate_up[e] = d_pre.to(hidden.dtype).T @ x_e
        torch.matmul(d_pre.to(hidden.dtype), w_gate_up[e], out=d_x_slots[rows])
    d_w = d_w_sorted[slot_pos.long()].view(T, k).to(topk_weights.dtype)
    d_hidden = _combine(d_x_slots, slot_pos, torch.ones_like(topk_weights), T, k).to(hidden.dtype)
    return d_hidden, d_w, d_w_gate_up, d_w_down


BACKEND = MoEBackend("torch", route_fwd, route_bwd, experts_fwd, experts_bwd)
