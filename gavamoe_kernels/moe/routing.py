"""Triton kernels for cluster-gated top-k routing and the routing metadata.

Router: each token reads the gate matrix of its own cluster (no per-token copy of the gate),
accumulates logits in fp32, then softmax, top-k (ties to the lower expert id) and
renormalisation in registers. Metadata: a stable counting sort of the token-slots by expert
in three launches, with no atomics and no host sync:
  1. per-block histograms, 2. per-expert prefix over blocks, 3. in-block rank and scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret

INTERPRET = triton_interpret()


@triton.jit
def _route_fwd_kernel(
    x_ptr, stride_xt, stride_xh,  # x: [T, H]
    w_ptr, stride_wc, stride_we, stride_wh,  # gate_weight: [C, E, H]
    cid_ptr,  # cluster_ids: [T]
    logits_ptr, stride_lt,  # logits out: [T, E] fp32
    tw_ptr, tid_ptr, stride_kt,  # topk weights / ids out: [T, K]
    T, E, H,
    K: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """logits[t,e] = sum_h W[c_t,e,h] x[t,h];  p = softmax(logits[t]);  top-k of p (ties: lower e);
    w = p[ids] (/ sum if NORMALIZE).  One program = BLOCK_T tokens, all E experts."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    t_mask = rt < T
    e_mask = re < E
    rt64 = rt.to(tl.int64)
    cid = tl.load(cid_ptr + rt64, mask=t_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)  # [BT, BE]
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_mask = rh < H
        x = tl.load(
            x_ptr + rt64[:, None] * stride_xt + rh[None, :] * stride_xh,
            mask=t_mask[:, None] & h_mask[None, :], other=0.0,
        ).to(tl.float32)  # [BT, BH]
        w = tl.load(
            w_ptr + cid[:, None, None] * stride_wc + re[None, :, None] * stride_we + rh[None, None, :] * stride_wh,
            mask=t_mask[:, None, None] & e_mask[None, :, None] & h_mask[None, None, :], other=0.0,
        ).to(tl.float32)  # [BT, BE, BH]
        acc += tl.sum(w * x[:, None, :], axis=2)
    tl.store(logits_ptr + rt64[:, None] * stride_lt + re[None, :], acc, mask=t_mask[:, None] & e_mask[None, :])

    logit = tl.where(e_mask[None, :], acc, float("-inf"))
    p = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BT, BE]
    # Selection key: a NaN row still picks K distinct valid experts (its weights stay NaN);
    # padding experts rank below every real one, picked ones below padding.
    key = tl.where(p == p, p, -1.0)
    key = tl.where(e_mask[None, :], key, -2.0)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == best[:, None], re[None, :], BLOCK_E), axis=1)  # lowest id among ties
        picked = re[None, :] == idx[:, None]
        val = tl.sum(tl.where(picked, p, 0.0), axis=1)
        top_w = tl.where(rk[None, :] == j, val[:, None], top_w)
        top_i = tl.where(rk[None, :] == j, idx[:, None], top_i)
        key = tl.where(picked, -3.0, key)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out_mask = t_mask[:, None] & (rk[None, :] < K)
    tl.store(tw_ptr + rt64[:, None] * stride_kt + rk[None, :], top_w, mask=out_mask)
    tl.store(tid_ptr + rt64[:, None] * stride_kt + rk[None, :], top_i.to(tl.int64), mask=out_mask)


@triton.jit
def _route_bwd_logits_kernel(
    dl_in_ptr, logits_ptr, stride_lt,  # d_logits in, logits: [T, E] fp32
    dtw_ptr, tw_ptr, tid_ptr, stride_kt,  # d topk weights, topk weights, ids: [T, K]
    dl_out_ptr,  # d logits out: [T, E] fp32 (same strides as logits)
    T, E, K,
    NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dL/ds_j = (g_j - sum_i g_i w_i) / sum_i s_i  (or g_j);  dp = scatter(ds);
    dl = p * (dp - sum(dp * p)) + d_logits_in.  One program = BLOCK_T tokens."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    t_mask = rt < T
    e_mask = re < E
    rt64 = rt.to(tl.int64)
    te_mask = t_mask[:, None] & e_mask[None, :]
    logit = tl.load(logits_ptr + rt64[:, None] * stride_lt + re[None, :], mask=te_mask, other=0.0)
    logit = tl.where(e_mask[None, :], logit, float("-inf"))
    p = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BT, BE]
    gw = tl.zeros([BLOCK_T], tl.float32)  # sum_i g_i w_i
    selected = tl.zeros([BLOCK_T], tl.float32)  # sum_i s_i
    if NORMALIZE:
        for j in range(K):
            e_j = tl.load(tid_ptr + rt64 * stride_kt + j, mask=t_mask, other=0)
            g_j = tl.load(dtw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
            w_j = tl.load(tw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
            gw += g_j * w_j
            selected += tl.sum(tl.where(re[None, :] == e_j[:, None], p, 0.0), axis=1)
    d_p = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for j in range(K):
        e_j = tl.load(tid_ptr + rt64 * stride_kt + j, mask=t_mask, other=0)
        g_j = tl.load(dtw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            g_j = (g_j - gw) / selected
        d_p += tl.where(re[None, :] == e_j[:, None], g_j[:, None], 0.0)
    d_l = p * (d_p - tl.sum(d_p * p, axis=1)[:, None])
    d_l += tl.load(dl_in_ptr + rt64[:, None] * stride_lt + re[None, :], mask=te_mask, other=0.0)
    tl.store(dl_out_ptr + rt64[:, None] * stride_lt + re[None, :], d_l, mask=te_mask)


@triton.jit
def _route_bwd_hidden_kernel(
    dl_ptr, stride_lt,  # d logits: [T, E] fp32
    w_ptr, stride_wc, stride_we, stride_wh,  # gate_weight: [C, E, H]
    cid_ptr,  # cluster_ids: [T]
    dx_ptr, stride_xt, stride_xh,  # d hidden out: [T, H]
    T, E, H,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dx[t,h] = sum_e dl[t,e] W[c_t,e,h].  Grid: (T blocks, H blocks)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    re = tl.arange(0, BLOCK_E)
    t_mask = rt < T
    e_mask = re < E
    h_mask = rh < H
    rt64 = rt.to(tl.int64)
    cid = tl.load(cid_ptr + rt64, mask=t_mask, other=0).to(tl.int64)
    d_l = tl.load(dl_ptr + rt64[:, None] * stride_lt + re[None, :], mask=t_mask[:, None] & e_mask[None, :], other=0.0)
    w = tl.load(
        w_ptr + cid[:, None, None] * stride_wc + re[None, :, None] * stride_we + rh[None, None, :] * stride_wh,
        mask=t_mask[:, None, None] & e_mask[None, :, None] & h_mask[None, None, :], other=0.0,
    ).to(tl.float32)  # [BT, BE, BH]
    d_x = tl.sum(w * d_l[:, :, None], axis=1)  # [BT, BH]
    tl.store(
        dx_ptr + rt64[:, None] * stride_xt + rh[None, :] * stride_xh,
        d_x.to(dx_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :],
    )


@triton.jit
def _route_bwd_gate_kernel(
    dl_ptr, stride_lt,  # d logits: [T, E] fp32
    x_ptr, stride_xt, stride_xh,  # hidden: [T, H]
    cid_ptr,  # cluster_ids: [T]
    dw_ptr, stride_wc, stride_we, stride_wh,  # d gate_weight out: [C, E, H]
    T, E, H,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dW[c,e,h] = sum_{t: c_t = c} dl[t,e] x[t,h].  Grid: (C, H blocks); every program walks
    all tokens in order, so the sum is deterministic (no atomics)."""
    c = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    re = tl.arange(0, BLOCK_E)
    e_mask = re < E
    h_mask = rh < H
    acc = tl.zeros([BLOCK_E, BLOCK_H], tl.float32)  # [BE, BH]
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        rt64 = rt.to(tl.int64)
        cid = tl.load(cid_ptr + rt64, mask=rt < T, other=-1)
        mine = cid == c
        d_l = tl.load(dl_ptr + rt64[:, None] * stride_lt + re[None, :], mask=mine[:, None] & e_mask[None, :], other=0.0)
        x = tl.load(
            x_ptr + rt64[:, None] * stride_xt + rh[None, :] * stride_xh, mask=mine[:, None] & h_mask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(d_l[:, :, None] * x[:, None, :], axis=0)
    tl.store(
        dw_ptr + c.to(tl.int64) * stride_wc + re[:, None] * stride_we + rh[None, :] * stride_wh,
        acc.to(dw_ptr.dtype.element_ty), mask=e_mask[:, None] & h_mask[None, :],
    )


@triton.jit
def _slot_block_hist_kernel(
    ids_ptr,  # expert id per slot: [n]
    block_counts_ptr,  # out: [NB, E] int32
    n, E,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """block_counts[b, e] = #{s in block b : ids[s] = e}."""
    b = tl.program_id(0)
    rs = b * BLOCK_S + tl.arange(0, BLOCK_S)
    re = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + rs.to(tl.int64), mask=rs < n, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == re[None, :]).to(tl.int32), axis=0)  # [BE]
    tl.store(block_counts_ptr + b.to(tl.int64) * E + re, counts, mask=re < E)


@triton.jit
def _slot_block_prefix_kernel(
    block_counts_ptr,  # [NB, E] int32
    block_offsets_ptr,  # out: [NB, E] int32, exclusive prefix over blocks
    counts_ptr,  # out: [E] int32
    NB, E,
    BLOCK_B: tl.constexpr,
):
    """block_offsets[b, e] = sum_{b' < b} block_counts[b', e];  counts[e] = total.  Grid: (E,)."""
    e = tl.program_id(0)
    running = tl.zeros([], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        c = tl.load(block_counts_ptr + rb.to(tl.int64) * E + e, mask=rb < NB, other=0)
        tl.store(block_offsets_ptr + rb.to(tl.int64) * E + e, running + tl.cumsum(c, 0) - c, mask=rb < NB)
        running += tl.sum(c)
    tl.store(counts_ptr + e, running)


@triton.jit
def _slot_scatter_kernel(
    ids_ptr,  # [n]
    block_offsets_ptr, counts_ptr,  # [NB, E], [E]
    sorted_slots_ptr, slot_pos_ptr,  # out: [n] int32 each
    n, E,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """pos(s) = start[e_s] + block_offsets[b, e_s] + #{s' < s in block b : e_s' = e_s};
    sorted_slots[pos(s)] = s;  slot_pos[s] = pos(s).  Stable: equal experts keep slot order."""
    b = tl.program_id(0)
    rs = b * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = rs < n
    re = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + rs.to(tl.int64), mask=s_mask, other=-1).to(tl.int32)
    counts = tl.load(counts_ptr + re, mask=re < E, other=0)
    start = tl.sum(tl.where(re[None, :] < ids[:, None], counts[None, :], 0), axis=1)  # [BS]
    block_off = tl.load(block_offsets_ptr + b.to(tl.int64) * E + ids, mask=s_mask, other=0)
    ri = tl.arange(0, BLOCK_S)
    same_before = (ids[:, None] == ids[None, :]) & (ri[None, :] < ri[:, None])  # [BS, BS]
    pos = start + block_off + tl.sum(same_before.to(tl.int32), axis=1)
    tl.store(sorted_slots_ptr + pos.to(tl.int64), rs, mask=s_mask)
    tl.store(slot_pos_ptr + rs.to(tl.int64), pos, mask=s_mask)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _router_blocks(E: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_H): keep the [BT, BE, BH] gate tile near 8K elements."""
    block_e = _pow2(E)
    block_t = 16 if INTERPRET else max(1, min(32, 4096 // block_e))
    block_h = min(_pow2(H, 16), max(16, 8192 // (block_t * block_e)))
    return block_t, block_e, block_h


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(logits [T,E] fp32, topk_weights [T,k] fp32, topk_ids [T,k] int64)."""
    T, H = hidden.shape
    E = gate_weight.shape[1]
    logits = torch.empty((T, E), device=hidden.device, dtype=torch.float32)
    weights = torch.empty((T, top_k), device=hidden.device, dtype=torch.float32)
    ids = torch.empty((T, top_k), device=hidden.device, dtype=torch.int64)
    if T == 0:
        return logits, weights, ids
    cluster_ids = cluster_ids.contiguous()  # the kernels read token t's id at cluster_ids + t
    block_t, block_e, block_h = _router_blocks(E, H)
    _route_fwd_kernel[(triton.cdiv(T, block_t),)](
        hidden, hidden.stride(0), hidden.stride(1),
        gate_weight, *gate_weight.stride(),
        cluster_ids,
        logits, logits.stride(0),
        weights, ids, weights.stride(0),
        T, E, H,
        K=top_k, NORMALIZE=normalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_K=_pow2(top_k),
    )
    return logits, weights, ids


def route_bwd(d_logits, d_weights, hidden, gate_weight, cluster_ids, logits, topk_weights, topk_ids, normalize):
    """(d_hidden [T,H], d_gate_weight [C,E,H])."""
    T, H = hidden.shape
    C, E, _ = gate_weight.shape
    d_hidden = torch.empty_like(hidden)
    d_gate = torch.empty_like(gate_weight)
    if T == 0:
        return d_hidden, d_gate.zero_()
    d_logits = d_logits.float().contiguous()
    d_weights = d_weights.float().contiguous()
    cluster_ids = cluster_ids.contiguous()
    d_l = torch.empty_like(logits)
    block_t, block_e, block_h = _router_blocks(E, H)
    _route_bwd_logits_kernel[(triton.cdiv(T, block_t),)](
        d_logits, logits, logits.stride(0),
        d_weights, topk_weights, topk_ids, topk_ids.stride(0),
        d_l,
        T, E, topk_ids.shape[1],
        NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e,
    )
    _route_bwd_hidden_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        d_l, d_l.stride(0),
        gate_weight, *gate_weight.stride(),
        cluster_ids,
        d_hidden, d_hidden.stride(0), d_hidden.stride(1),
        T, E, H,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h,
    )
    _route_bwd_gate_kernel[(C, triton.cdiv(H, block_h))](
        d_l, d_l.stride(0),
        hidden, hidden.stride(0), hidden.stride(1),
        cluster_ids,
        d_gate, *d_gate.stride(),
        T, E, H,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=block_h,
    )
    return d_hidden, d_gate


SLOT_BLOCK = 128


def routing_metadata(topk_ids: torch.Tensor, num_experts: int):
    """(sorted_slots [n], slot_pos [n], counts [E]) int32, equal to the torch backend's stable sort."""
    flat = topk_ids.reshape(-1).contiguous()  # the kernels read slot s at flat + s
    n = flat.numel()
    device = flat.device
    sorted_slots = torch.empty(n, device=device, dtype=torch.int32)
    slot_pos = torch.empty(n, device=device, dtype=torch.int32)
    counts = torch.empty(num_experts, device=device, dtype=torch.int32)
    if n == 0:
        return sorted_slots, slot_pos, counts.zero_()
    nb = triton.cdiv(n, SLOT_BLOCK)
    block_e = _pow2(num_experts)
    block_counts = torch.empty((nb, num_experts), device=device, dtype=torch.int32)
    block_offsets = torch.empty_like(block_counts)
    _slot_block_hist_kernel[(nb,)](flat, block_counts, n, num_experts, BLOCK_S=SLOT_BLOCK, BLOCK_E=block_e)
    _slot_block_prefix_kernel[(num_experts,)](
        block_counts, block_offsets, counts, nb, num_experts, BLOCK_B=min(1024, _pow2(nb, 16))
    )
    _slot_scatter_kernel[(nb,)](
        flat, block_offsets, counts, sorted_slots, slot_pos, n, num_experts, BLOCK_S=SLOT_BLOCK, BLOCK_E=block_e
    )
    return sorted_slots, slot_pos, counts
