"""Triton kernels of the cluster-gated top-k router, forward and backward, on tensor cores.

The gates of all C clusters are one matrix of C * E rows. A program takes a tile of tokens and
computes its logits against every gate row with one ``tl.dot`` (the columns of a token's own
cluster are picked in the epilogue), then softmax, top-k (ties to the lower expert id) and
renormalisation in registers. When C * E is too wide for one tile (more than MAX_GATE_COLS
padded columns), the tile visits the clusters its tokens belong to, one ``tl.dot`` each.

Backward, with dl = d loss / d logits (softmax and top-k backward, in registers) and
dl_wide[t, c*E + e] = dl[t, e] if c == cluster of t else 0:
    d hidden = dl_wide @ W_all          (one dot kernel, grid over token tiles x H tiles)
    d W_all  = dl_wide^T @ hidden       (one dot kernel, grid over H tiles x token chunks;
                                         chunk partials summed in a fixed order: deterministic)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import INTERPRET, pow2, precision, row_chunks

MAX_GATE_COLS = 256  # C * E_pad columns in one dot tile; wider gates take the per-cluster path


@triton.jit
def _cluster_columns(acc, cid, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BT, BC * BE] (column c * BE + e) -> [BT, BE]: each token's columns of its own cluster."""
    acc3 = tl.reshape(acc, [BLOCK_T, BLOCK_C, BLOCK_E])
    rc = tl.arange(0, BLOCK_C)
    return tl.sum(tl.where(rc[None, :, None] == cid[:, None, None], acc3, 0.0), axis=1)


@triton.jit
def _spread_to_clusters(dl, cid, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BT, BE] -> [BT, BC * BE]: dl in its token's cluster block of columns, zeros elsewhere."""
    rc = tl.arange(0, BLOCK_C)
    wide = tl.where(rc[None, :, None] == cid[:, None, None], dl[:, None, :], 0.0)  # [BT, BC, BE]
    return tl.reshape(wide, [BLOCK_T, BLOCK_C * BLOCK_E])


@triton.jit
def _gate_rows(BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """Cluster and expert of each of the BC * BE rows of the padded all-cluster gate matrix
    (row j = c * BE + e)."""
    rj = tl.arange(0, BLOCK_C * BLOCK_E)
    return rj // BLOCK_E, rj % BLOCK_E


@triton.jit
def _gate_logits(
    x_ptr, stride_xt, stride_xh, rt64, t_mask,
    w_ptr, stride_wc, stride_we, stride_wh,
    cid, C, E, H,
    PRECISION: tl.constexpr, ALL_CLUSTERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """logits[t, e] = sum_h W[c_t, e, h] x[t, h] in fp32 for a tile of tokens; [BT, BE].
    The two paths are the branches of one if/else. Written as an early ``return`` inside an
    ``if`` on a constexpr they did not compile: Triton's code generator goes on past such a return
    and met the second path's ``w_rows`` with the first one's shape (found by
    benchmarks/triton_check.py; the interpreter runs the Python and never saw it)."""
    re = tl.arange(0, BLOCK_E)
    if ALL_CLUSTERS:
        jc, je = _gate_rows(BLOCK_C, BLOCK_E)
        w_rows = w_ptr + jc.to(tl.int64) * stride_wc + je * stride_we
        j_mask = (jc < C) & (je < E)
        acc = tl.zeros([BLOCK_T, BLOCK_C * BLOCK_E], tl.float32)  # [BT, BC*BE]
        for h0 in range(0, H, BLOCK_H):
            rh = h0 + tl.arange(0, BLOCK_H)
            h_mask = rh < H
            x = tl.load(x_ptr + rt64[:, None] * stride_xt + rh[None, :] * stride_xh,
                        mask=t_mask[:, None] & h_mask[None, :], other=0.0)  # [BT, BH]
            w = tl.load(w_rows[:, None] + rh[None, :] * stride_wh, mask=j_mask[:, None] & h_mask[None, :],
                        other=0.0)  # [BC*BE, BH]
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        logits = _cluster_columns(acc, cid, BLOCK_T, BLOCK_C, BLOCK_E)
    else:
        logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for c in range(0, C):
            mine = (cid == c) & t_mask
            if tl.max(mine.to(tl.int32), axis=0) > 0:  # only the clusters present in this tile
                w_rows = w_ptr + tl.cast(c, tl.int64) * stride_wc + re * stride_we
                acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    rh = h0 + tl.arange(0, BLOCK_H)
                    h_mask = rh < H
                    x = tl.load(x_ptr + rt64[:, None] * stride_xt + rh[None, :] * stride_xh,
                                mask=mine[:, None] & h_mask[None, :], other=0.0)  # [BT, BH]
                    w = tl.load(w_rows[:, None] + rh[None, :] * stride_wh,
                                mask=(re < E)[:, None] & h_mask[None, :], other=0.0)  # [BE, BH]
                    acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
                logits = tl.where(mine[:, None], acc, logits)
    return logits


@triton.jit
def _route_fwd_kernel(
    x_ptr, stride_xt, stride_xh,  # hidden: [T, H]
    w_ptr, stride_wc, stride_we, stride_wh,  # gate_weight: [C, E, H]
    cid_ptr,  # cluster_ids: [T] (contiguous)
    tw_ptr, tid_ptr, stride_kt,  # out topk weights fp32 / ids int64: [T, K]
    logits_ptr, stride_lt,  # out logits: [T, E] fp32
    T, C, E, H,
    K: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, ALL_CLUSTERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """logits[t,e] = sum_h W[c_t,e,h] x[t,h];  p = softmax(logits[t]);  top-k of p (ties: lower e);
    w = p[ids] (/ sum if NORMALIZE).  One program = BLOCK_T tokens, all E experts."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    t_mask = rt < T
    e_mask = re < E
    rt64 = rt.to(tl.int64)
    cid = tl.load(cid_ptr + rt64, mask=t_mask, other=0).to(tl.int32)
    logits = _gate_logits(x_ptr, stride_xt, stride_xh, rt64, t_mask, w_ptr, stride_wc, stride_we, stride_wh,
                          cid, C, E, H, PRECISION, ALL_CLUSTERS, BLOCK_T, BLOCK_C, BLOCK_E, BLOCK_H)
    tl.store(logits_ptr + rt64[:, None] * stride_lt + re[None, :], logits, mask=t_mask[:, None] & e_mask[None, :])

    logit = tl.where(e_mask[None, :], logits, float("-inf"))
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
def _logits_grad(
    dl_in_ptr, logits_ptr, stride_lt,  # d logits in, logits: [T, E] fp32 (same strides)
    dtw_ptr, tw_ptr, tid_ptr, stride_kt,  # d topk weights, topk weights, ids: [T, K]
    rt64, t_mask, E, K,
    NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dl = d loss / d logits for a tile of tokens, [BT, BE] fp32:
    dL/ds_j = (g_j - sum_i g_i w_i) / sum_i s_i (or g_j);  dp = scatter(ds);
    dl = p * (dp - sum(dp * p)) + d_logits_in."""
    re = tl.arange(0, BLOCK_E)
    e_mask = re < E
    te_mask = t_mask[:, None] & e_mask[None, :]
    logit = tl.load(logits_ptr + rt64[:, None] * stride_lt + re[None, :], mask=te_mask, other=0.0)
    logit = tl.where(e_mask[None, :], logit, float("-inf"))
    p = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BT, BE]
    gw = tl.sum(tl.zeros_like(p), axis=1)  # sum_i g_i w_i  [BT]
    selected = tl.sum(tl.zeros_like(p), axis=1)  # sum_i s_i
    if NORMALIZE:
        for j in range(K):
            e_j = tl.load(tid_ptr + rt64 * stride_kt + j, mask=t_mask, other=0)
            g_j = tl.load(dtw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
            w_j = tl.load(tw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
            gw += g_j * w_j
            selected += tl.sum(tl.where(re[None, :] == e_j[:, None], p, 0.0), axis=1)
    d_p = tl.zeros_like(p)
    for j in range(K):
        e_j = tl.load(tid_ptr + rt64 * stride_kt + j, mask=t_mask, other=0)
        g_j = tl.load(dtw_ptr + rt64 * stride_kt + j, mask=t_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            g_j = (g_j - gw) / selected
        d_p += tl.where(re[None, :] == e_j[:, None], g_j[:, None], 0.0)
    d_l = p * (d_p - tl.sum(d_p * p, axis=1)[:, None])
    d_l += tl.load(dl_in_ptr + rt64[:, None] * stride_lt + re[None, :], mask=te_mask, other=0.0)
    return tl.where(te_mask, d_l, 0.0)


@triton.jit
def _route_bwd_hidden_kernel(
    dl_in_ptr, logits_ptr, stride_lt,  # d logits in, logits: [T, E] fp32
    dtw_ptr, tw_ptr, tid_ptr, stride_kt,  # d topk weights, topk weights, ids: [T, K]
    w_ptr, stride_wc, stride_we, stride_wh,  # gate_weight: [C, E, H]
    cid_ptr,  # cluster_ids: [T]
    dl_out_ptr,  # out d logits (total): [T, E] fp32, same strides as logits
    dx_ptr, stride_dxt,  # out d hidden: [T, H] contiguous
    T, C, E, H, K,
    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, ALL_CLUSTERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dl (softmax and top-k backward, in registers; stored once by the programs of H tile 0);
    dx[t, h] = sum_e dl[t, e] W[c_t, e, h] = (dl_wide @ W_all)[t, h].  Grid: (T tiles, H tiles)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    re = tl.arange(0, BLOCK_E)
    t_mask = rt < T
    h_mask = rh < H
    rt64 = rt.to(tl.int64)
    cid = tl.load(cid_ptr + rt64, mask=t_mask, other=0).to(tl.int32)
    d_l = _logits_grad(dl_in_ptr, logits_ptr, stride_lt, dtw_ptr, tw_ptr, tid_ptr, stride_kt, rt64, t_mask, E, K,
                       NORMALIZE, BLOCK_E)  # [BT, BE]
    if tl.program_id(1) == 0:
        tl.store(dl_out_ptr + rt64[:, None] * stride_lt + re[None, :], d_l, mask=t_mask[:, None] & (re < E)[None, :])
    dot_dtype = w_ptr.dtype.element_ty
    if ALL_CLUSTERS:
        jc, je = _gate_rows(BLOCK_C, BLOCK_E)
        w = tl.load(w_ptr + jc.to(tl.int64)[:, None] * stride_wc + je[:, None] * stride_we + rh[None, :] * stride_wh,
                    mask=((jc < C) & (je < E))[:, None] & h_mask[None, :], other=0.0)  # [BC*BE, BH]
        wide = _spread_to_clusters(d_l, cid, BLOCK_T, BLOCK_C, BLOCK_E).to(dot_dtype)  # [BT, BC*BE]
        d_x = tl.dot(wide, w, input_precision=PRECISION)  # [BT, BH]
    else:
        d_x = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        for c in range(0, C):
            mine = (cid == c) & t_mask
            if tl.max(mine.to(tl.int32), axis=0) > 0:
                w_c = w_ptr + tl.cast(c, tl.int64) * stride_wc
                w = tl.load(w_c + re[:, None] * stride_we + rh[None, :] * stride_wh,
                            mask=(re < E)[:, None] & h_mask[None, :], other=0.0)  # [BE, BH]
                d_x = tl.dot(tl.where(mine[:, None], d_l, 0.0).to(dot_dtype), w, d_x, input_precision=PRECISION)
    tl.store(dx_ptr + rt64[:, None] * stride_dxt + rh[None, :], d_x.to(dx_ptr.dtype.element_ty),
             mask=t_mask[:, None] & h_mask[None, :])


@triton.jit
def _route_bwd_gate_kernel(
    dl_ptr, stride_lt,  # d logits: [T, E] fp32
    x_ptr, stride_xt, stride_xh,  # hidden: [T, H]
    cid_ptr,  # cluster_ids: [T]
    dw_ptr,  # out partial d gate_weight: [P, C, E, H] fp32, contiguous
    T, C, E, H, TOKENS_PER_PROGRAM,
    PRECISION: tl.constexpr, ALL_CLUSTERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dW[p, c, e, h] = sum over the tokens t of chunk p with c_t = c of dl[t, e] x[t, h]
    = (dl_wide^T @ x)[c*E + e, h].  Grid: (H tiles, P chunks); every program walks its tokens
    in order, so the sum is deterministic (no atomics)."""
    rh = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    p = tl.program_id(1)
    re = tl.arange(0, BLOCK_E)
    h_mask = rh < H
    t_first = p.to(tl.int64) * TOKENS_PER_PROGRAM
    t_last = tl.minimum(t_first + TOKENS_PER_PROGRAM, T)
    dot_dtype = x_ptr.dtype.element_ty
    out = dw_ptr + p.to(tl.int64) * C * E * H
    if ALL_CLUSTERS:
        acc = tl.zeros([BLOCK_C * BLOCK_E, BLOCK_H], tl.float32)  # [BC*BE, BH]
        for t0 in range(t_first, t_last, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_mask = rt < t_last
            cid = tl.load(cid_ptr + rt, mask=t_mask, other=0).to(tl.int32)
            d_l = tl.load(dl_ptr + rt[:, None] * stride_lt + re[None, :], mask=t_mask[:, None] & (re < E)[None, :],
                          other=0.0)  # [BT, BE]
            x = tl.load(x_ptr + rt[:, None] * stride_xt + rh[None, :] * stride_xh,
                        mask=t_mask[:, None] & h_mask[None, :], other=0.0)  # [BT, BH]
            wide = _spread_to_clusters(d_l, cid, BLOCK_T, BLOCK_C, BLOCK_E).to(dot_dtype)
            acc = tl.dot(tl.trans(wide), x, acc, input_precision=PRECISION)
        jc, je = _gate_rows(BLOCK_C, BLOCK_E)
        tl.store(out + (jc * E + je)[:, None].to(tl.int64) * H + rh[None, :], acc,
                 mask=((jc < C) & (je < E))[:, None] & h_mask[None, :])
    else:
        for c in range(0, C):
            acc = tl.zeros([BLOCK_E, BLOCK_H], tl.float32)  # [BE, BH]
            for t0 in range(t_first, t_last, BLOCK_T):
                rt = t0 + tl.arange(0, BLOCK_T)
                cid = tl.load(cid_ptr + rt, mask=rt < t_last, other=-1)
                mine = cid == c
                d_l = tl.load(dl_ptr + rt[:, None] * stride_lt + re[None, :], mask=mine[:, None] & (re < E)[None, :],
                              other=0.0)
                x = tl.load(x_ptr + rt[:, None] * stride_xt + rh[None, :] * stride_xh,
                            mask=mine[:, None] & h_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(d_l.to(dot_dtype)), x, acc, input_precision=PRECISION)
            tl.store(out + (c * E + re)[:, None].to(tl.int64) * H + rh[None, :], acc,
                     mask=(re < E)[:, None] & h_mask[None, :])


def _router_blocks(C: int, E: int) -> dict:
    """Block sizes and path of the router: the [BT, BC * BE] logit tile stays at <= 8K fp32
    (E >= 64 must not spill registers), and tl.dot needs every dimension >= 16."""
    block_e = pow2(E, 16)
    block_c = pow2(C)
    all_clusters = block_c * block_e <= MAX_GATE_COLS
    cols = block_c * block_e if all_clusters else block_e
    block_t = 16 if INTERPRET else max(16, min(64, 8192 // cols))
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_E=block_e, ALL_CLUSTERS=all_clusters,
                num_warps=8 if block_t * cols >= 8192 else 4)


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32)."""
    T, H = hidden.shape
    C, E, _ = gate_weight.shape
    weights = torch.empty((T, top_k), device=hidden.device, dtype=torch.float32)
    ids = torch.empty((T, top_k), device=hidden.device, dtype=torch.int64)
    logits = torch.empty((T, E), device=hidden.device, dtype=torch.float32)
    if T == 0:
        return weights, ids, logits
    cluster_ids = cluster_ids.contiguous()  # the kernels read token t's id at cluster_ids + t
    blocks = _router_blocks(C, E)
    _route_fwd_kernel[(triton.cdiv(T, blocks["BLOCK_T"]),)](
        hidden, hidden.stride(0), hidden.stride(1),
        gate_weight, *gate_weight.stride(),
        cluster_ids,
        weights, ids, weights.stride(0),
        logits, logits.stride(0),
        T, C, E, H,
        K=top_k, NORMALIZE=normalize, PRECISION=precision(hidden.dtype), BLOCK_H=32 if INTERPRET else 64,
        BLOCK_K=pow2(top_k), **blocks,
    )
    return weights, ids, logits


def route_bwd(d_weights, d_logits, hidden, gate_weight, cluster_ids, topk_weights, topk_ids, logits, normalize):
    """(d_hidden [T,H] contiguous in hidden's dtype, d_gate_weight [C,E,H] in gate_weight's dtype)."""
    T, H = hidden.shape
    C, E, _ = gate_weight.shape
    d_hidden = torch.empty((T, H), device=hidden.device, dtype=hidden.dtype)
    if T == 0:
        return d_hidden, torch.zeros((C, E, H), device=hidden.device, dtype=gate_weight.dtype)
    d_logits = d_logits.float().contiguous()
    d_weights = d_weights.float().contiguous()
    cluster_ids = cluster_ids.contiguous()
    blocks = _router_blocks(C, E)
    block_h = 32 if INTERPRET else (64 if blocks["ALL_CLUSTERS"] and blocks["BLOCK_C"] * blocks["BLOCK_E"] <= 128
                                    else 32)
    d_l = torch.empty_like(logits)
    _route_bwd_hidden_kernel[(triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(H, block_h))](
        d_logits, logits, logits.stride(0),
        d_weights, topk_weights, topk_ids, topk_ids.stride(0),
        gate_weight, *gate_weight.stride(),
        cluster_ids,
        d_l,
        d_hidden, d_hidden.stride(0),
        T, C, E, H, topk_ids.shape[1],
        NORMALIZE=normalize, PRECISION=precision(hidden.dtype), BLOCK_H=block_h, **blocks,
    )
    # token chunks: enough programs to fill a GPU, each chunk a multiple of BLOCK_T tokens
    h_tiles = triton.cdiv(H, block_h)
    chunks, per_chunk = row_chunks(T, blocks["BLOCK_T"], h_tiles, hidden.device, programs=512, cpu_chunks=2)
    partial = torch.empty((chunks, C, E, H), device=hidden.device, dtype=torch.float32)
    _route_bwd_gate_kernel[(h_tiles, chunks)](
        d_l, d_l.stride(0),
        hidden, hidden.stride(0), hidden.stride(1),
        cluster_ids,
        partial,
        T, C, E, H, per_chunk,
        PRECISION=precision(hidden.dtype), BLOCK_H=block_h, **blocks,
    )
    return d_hidden, partial.sum(0).to(gate_weight.dtype)
