"""Triton grouped GEMMs for SwiGLU experts over token-slots sorted by expert.

Rows of every GEMM are token-slots in expert order (metadata.py). Row tiles are numbered
expert by expert, ceil(count_e / BLOCK_M) each, and a (row tile, column tile) pair is one tile
of work. The tile list exists only on the device (it follows from the per-expert counts), so
the kernels are persistent: a grid of about one program per SM walks tile ids
pid, pid + grid, ... up to the real number of tiles read from the counts, with no host sync and
no empty programs. Tile ids map to (row tile, column tile) in grouped order: GROUP_M row tiles
are finished across every column tile before the next GROUP_M start, so the GROUP_M row blocks
of A and one column block of B are what a wave of programs reads, and both stay in L2.

Rows of hidden and d_y are gathered while the tile loads: no permuted copy of them exists.

Forward:  pre_act = x[tok] @ Wgu_e.T -> act = silu(g) * u (epilogue) -> out = act @ Wd_e.T
          -> y[t] = sum_j w[t,j] * out[pos(t,j)]  (per-token gather-and-sum, no atomics)
Backward: d_act' = d_y[tok] @ Wd_e;  d_w = sum(d_act' * act);  d_pre = dSwiGLU(w * d_act')
          wact = w * act (the weight applied once, here)
          dWd_e = sum_r d_y[tok]^T wact,  dWgu_e = sum_r d_pre^T x[tok],  dx = sum_j (d_pre @ Wgu_e)

Decoding (T <= 64): BLOCK_M = next_pow2(T) >= the rows of any expert, so one row tile per
active expert and each active expert's weights are read once; narrow column tiles (16-64)
spread those weights over the SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import (
    INTERPRET,
    config_grid,
    num_sms,
    pow2,
    precision,
    rows_bucket,
    set_tma_allocator,
    tma_enabled,
    tuned,
)
from .metadata import routing_metadata

DECODE_MAX_TOKENS = 64
GROUP_M = 8
ACT_GRAD_MIN_BLOCK_N = 32  # the partial d_w buffer has one column per column tile of this width


@triton.jit
def _row_tile_table(counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per expert (padded to BE): counts, row tiles, end of its tile ids, first sorted row; and
    the number of real row tiles."""
    re = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + re, mask=re < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    row_start = tl.cumsum(counts, 0) - counts
    return counts, tiles, tile_end, row_start, tl.sum(tiles, 0)


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile id -> (row tile, column tile) in grouped order: within a group of GROUP_M row tiles
    the row tile moves fastest, and the group covers every column tile before the next starts."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(tile, num_m, num_n, counts, tiles, tile_end, row_start,
               GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Tile id -> (expert, column tile, its sorted rows as int64 [BM], their mask [BM])."""
    pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
    re = tl.arange(0, BLOCK_E)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = re == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    start = tl.sum(tl.where(mine, row_start, 0), 0)
    row_end = start + tl.sum(tl.where(mine, counts, 0), 0)
    rm = start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, pid_n, rm.to(tl.int64), rm < row_end


@triton.jit
def _rows_matmul(
    a_ptr, a_rows, m_mask, stride_am, stride_ak,  # A: rows a_rows (int64) of [*, K]
    b_ptr, stride_bk, stride_bn, rn, n_mask,  # B: [K, N] of one expert, columns rn
    K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k A[a_rows[m], k] * B[k, rn[n]] in fp32; [BM, BN]."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _rows_matmul_tma(
    a_ptr, a_rows, m_mask, stride_am, stride_ak,  # A: rows a_rows (int64) of [*, K]
    b_desc, b_row0, n0,  # B through a tensor descriptor of the weights, expert's block at row b_row0
    K,
    B_KMAJOR: tl.constexpr,  # B stored [N, K] (K contiguous) rather than [K, N]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """As _rows_matmul, with B tiles brought in by the Tensor Memory Accelerator. Rows past the
    expert's block belong to the next expert (or are zero past the tensor): they meet only
    masked-off columns of A or are dropped at the store."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & (rk < K)[None, :], other=0.0)  # [BM, BK]
        if B_KMAJOR:
            acc = tl.dot(a, tl.trans(b_desc.load([b_row0 + n0, k0])), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b_desc.load([b_row0 + k0, n0]), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _up_swiglu_fwd_kernel(
    x_ptr, stride_xt, stride_xh,  # hidden: [T, H]
    w_ptr, stride_we, stride_wn, stride_wh,  # w_gate_up: [E, 2I, H]
    pre_ptr, stride_pm,  # out pre_act = [g | u]: [n, 2I] sorted (written if STORE_PRE)
    act_ptr, stride_am,  # out act = silu(g) * u: [n, I] sorted
    sorted_slots_ptr, counts_ptr,  # [n], [E]
    H, I, E, TOP_K, ROWS_BUCKET,
    STORE_PRE: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """g = x[tok] @ Wgu_e[:I].T,  u = x[tok] @ Wgu_e[I:].T,  act = silu(g) * u.
    Tile = BLOCK_M sorted rows of one expert x BLOCK_N of I; x rows gathered on load."""
    counts, tiles, tile_end, row_start, num_m = _row_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
    num_n = tl.cdiv(I, BLOCK_N)
    if USE_TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * 2 * I, H], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        expert, pid_n, rm64, m_mask = _tile_rows(tile, num_m, num_n, counts, tiles, tile_end, row_start,
                                                 GROUP_M, BLOCK_M, BLOCK_E)
        token = (tl.load(sorted_slots_ptr + rm64, mask=m_mask, other=0) // TOP_K).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < I
        gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # [BM, BN]
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_gate = w_ptr + expert.to(tl.int64) * stride_we
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < H
            x = tl.load(x_ptr + token[:, None] * stride_xt + rk[None, :] * stride_xh,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
            if USE_TMA:
                row_g = expert * 2 * I + pid_n * BLOCK_N
                gate = tl.dot(x, tl.trans(w_desc.load([row_g, k0])), gate, input_precision=PRECISION)
                up = tl.dot(x, tl.trans(w_desc.load([row_g + I, k0])), up, input_precision=PRECISION)
            else:
                w_off = rk[:, None] * stride_wh + rn[None, :] * stride_wn
                w_mask = k_mask[:, None] & n_mask[None, :]
                gate = tl.dot(x, tl.load(w_gate + w_off, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
                up = tl.dot(x, tl.load(w_gate + I * stride_wn + w_off, mask=w_mask, other=0.0), up,
                            input_precision=PRECISION)
        act = gate * tl.sigmoid(gate) * up
        out_mask = m_mask[:, None] & n_mask[None, :]
        if STORE_PRE:
            pre_rows = pre_ptr + rm64[:, None] * stride_pm + rn[None, :]
            tl.store(pre_rows, gate.to(pre_ptr.dtype.element_ty), mask=out_mask)
            tl.store(pre_rows + I, up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(act_ptr + rm64[:, None] * stride_am + rn[None, :], act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_matmul_kernel(
    a_ptr, stride_am, stride_ak,  # A: [n, K] sorted
    b_ptr, stride_be, stride_bk, stride_bn,  # B: per expert [K, N] through strides
    c_ptr, stride_cm,  # C out: [n, N] sorted
    counts_ptr,  # [E]
    N, K, E, ROWS_BUCKET,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, B_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[r] = A[r] @ B_e for the sorted rows r of expert e (down projection; d_pre @ Wgu_e)."""
    counts, tiles, tile_end, row_start, num_m = _row_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
    num_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        if B_KMAJOR:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        expert, pid_n, rm64, m_mask = _tile_rows(tile, num_m, num_n, counts, tiles, tile_end, row_start,
                                                 GROUP_M, BLOCK_M, BLOCK_E)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        if USE_TMA:
            acc = _rows_matmul_tma(a_ptr, rm64, m_mask, stride_am, stride_ak,
                                   b_desc, expert * (N if B_KMAJOR else K), pid_n * BLOCK_N, K,
                                   B_KMAJOR, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        else:
            acc = _rows_matmul(a_ptr, rm64, m_mask, stride_am, stride_ak,
                               b_ptr + expert.to(tl.int64) * stride_be, stride_bk, stride_bn, rn, n_mask,
                               K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _act_grad_kernel(
    dy_ptr, stride_dyt, stride_dyh,  # d_y: [T, H]
    w_ptr, stride_we, stride_wh, stride_wi,  # w_down: [E, H, I]
    pre_ptr, stride_pm,  # saved pre_act = [g | u]: [n, 2I] sorted
    tw_ptr,  # topk weights, flat by slot: [n]
    dpre_ptr, stride_dpm,  # out d pre_act: [n, 2I] sorted
    wact_ptr, stride_wam,  # out w * act: [n, I] sorted
    dw_part_ptr, stride_dwm,  # out partial d_w by slot and column tile: [n, P] fp32 (zeroed)
    sorted_slots_ptr, counts_ptr,
    H, I, E, TOP_K, ROWS_BUCKET,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """d_act' = d_y[tok] @ Wd_e (the unweighted expert output's gradient);  act = silu(g) * u;
    d_w partial = sum_n d_act' * act;  wact = w act;  d_g = w d_act' u silu'(g);  d_u = w d_act' silu(g)."""
    counts, tiles, tile_end, row_start, num_m = _row_tile_table(counts_ptr, E, BLOCK_M, BLOCK_E)
    num_n = tl.cdiv(I, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        expert, pid_n, rm64, m_mask = _tile_rows(tile, num_m, num_n, counts, tiles, tile_end, row_start,
                                                 GROUP_M, BLOCK_M, BLOCK_E)
        slot = tl.load(sorted_slots_ptr + rm64, mask=m_mask, other=0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < I
        d_act = _rows_matmul(dy_ptr, slot // TOP_K, m_mask, stride_dyt, stride_dyh,
                             w_ptr + expert.to(tl.int64) * stride_we, stride_wh, stride_wi, rn, n_mask,
                             H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # [BM, BN]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        pre_rows = pre_ptr + rm64[:, None] * stride_pm + rn[None, :]
        gate = tl.load(pre_rows, mask=mn_mask, other=0.0).to(tl.float32)
        up = tl.load(pre_rows + I, mask=mn_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        tl.store(dw_part_ptr + slot * stride_dwm + pid_n, tl.sum(tl.where(mn_mask, d_act * act, 0.0), axis=1),
                 mask=m_mask)
        w = tl.load(tw_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        d_act = d_act * w
        dpre_rows = dpre_ptr + rm64[:, None] * stride_dpm + rn[None, :]
        tl.store(dpre_rows, (d_act * up * sig * (1.0 + gate * (1.0 - sig))).to(dpre_ptr.dtype.element_ty),
                 mask=mn_mask)
        tl.store(dpre_rows + I, (d_act * silu).to(dpre_ptr.dtype.element_ty), mask=mn_mask)
        tl.store(wact_ptr + rm64[:, None] * stride_wam + rn[None, :], (w * act).to(wact_ptr.dtype.element_ty),
                 mask=mn_mask)


@triton.jit
def _grouped_weight_grad_kernel(
    l_ptr, stride_lr, stride_lm,  # left rows: [*, M] (gathered by token if L_GATHER, else sorted)
    r_ptr, stride_rr, stride_rn,  # right rows: [*, N] (gathered by token if R_GATHER, else sorted)
    out_ptr, stride_oe, stride_om, stride_on,  # out: [E, M, N]
    sorted_slots_ptr, counts_ptr,
    M, N, E, TOP_K, ROWS_BUCKET,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[e] = sum_{sorted rows r of e} L[row_l(r)]^T R[row_r(r)];  [M, N] per expert.
    Grid: (M tiles, N tiles, E); an expert with no rows gets zeros."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    re = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + re, mask=re < E, other=0)
    mine = re == expert
    row0 = tl.sum(tl.where(mine, tl.cumsum(counts, 0) - counts, 0), 0)
    count = tl.sum(tl.where(mine, counts, 0), 0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # [BM, BN]
    for s0 in range(0, count, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        s_mask = rs < count
        rows = (row0 + rs).to(tl.int64)
        slot = tl.load(sorted_slots_ptr + rows, mask=s_mask, other=0).to(tl.int64)
        if L_GATHER:
            l_rows = slot // TOP_K
        else:
            l_rows = rows
        if R_GATHER:
            r_rows = slot // TOP_K
        else:
            r_rows = rows
        left = tl.load(l_ptr + l_rows[:, None] * stride_lr + rm[None, :] * stride_lm,
                       mask=s_mask[:, None] & m_mask[None, :], other=0.0)  # [BS, BM]
        right = tl.load(r_ptr + r_rows[:, None] * stride_rr + rn[None, :] * stride_rn,
                        mask=s_mask[:, None] & n_mask[None, :], other=0.0)  # [BS, BN]
        acc = tl.dot(tl.trans(left), right, acc, input_precision=PRECISION)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(
    src_ptr, stride_sm,  # per-slot rows: [n, H] sorted
    slot_pos_ptr,  # [n]: sorted position of slot t*K + j
    w_ptr,  # weights by slot: [n] (if HAS_WEIGHT)
    y_ptr, stride_yt,  # out: [T, H], unit stride along H
    T, H, TOP_K,
    HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """y[t] = sum_j w[t,j] * src[pos(t,j)] in fp32; each token reads its own k rows (no atomics)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = rt < T
    mask = t_mask[:, None] & (rh < H)[None, :]
    rt64 = rt.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in range(TOP_K):
        slot = rt64 * TOP_K + j
        pos = tl.load(slot_pos_ptr + slot, mask=t_mask, other=0).to(tl.int64)
        row = tl.load(src_ptr + pos[:, None] * stride_sm + rh[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            row = row * tl.load(w_ptr + slot, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        acc += row
    tl.store(y_ptr + rt64[:, None] * stride_yt + rh[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---- configurations: up to 128 x 256 x 64 on a GPU; small fixed blocks under the interpreter -----------

_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_MM = config_grid(("BLOCK_M", "BLOCK_N", "BLOCK_K"), BLOCK_M=(64, 128), BLOCK_N=(128, 256), BLOCK_K=(64,))
_UP = config_grid(("BLOCK_M", "BLOCK_N", "BLOCK_K"), BLOCK_M=(64, 128), BLOCK_N=(64, 128), BLOCK_K=(64,))
_DECODE = config_grid(("BLOCK_N", "BLOCK_K"), stages=(4, 5), BLOCK_N=(16, 32, 64), BLOCK_K=(64, 128))
# The act-grad epilogue keeps about six fp32 tiles and three pointer tiles live: compiled for sm_90 in
# bf16 (benchmarks/triton_check.py) the 128-wide tiles spill about 2 KB a thread, the last two do not.
_ACT_GRAD = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64}, num_warps=w, num_stages=s)
             for m, n, w in ((64, 128, 4), (128, 128, 8), (64, 256, 8), (64, 64, 8), (128, 32, 8)) for s in (3, 4)]
_WGRAD = config_grid(("BLOCK_M", "BLOCK_N", "BLOCK_S"), BLOCK_M=(64, 128), BLOCK_N=(64, 128), BLOCK_S=(64,))
_DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}

_up_prefill = tuned(_UP, ["H", "I", "ROWS_BUCKET", "USE_TMA"], _DEFAULT, _INTERPRET, 8)(_up_swiglu_fwd_kernel)
_up_decode = tuned(_DECODE, ["H", "I", "BLOCK_M", "USE_TMA"], {"BLOCK_N": 32, "BLOCK_K": 128},
                   {"BLOCK_N": 32, "BLOCK_K": 32})(_up_swiglu_fwd_kernel)
_mm_prefill = tuned(_MM, ["N", "K", "ROWS_BUCKET", "B_KMAJOR", "USE_TMA"], _DEFAULT, _INTERPRET, 8)(
    _grouped_matmul_kernel)
_mm_decode = tuned(_DECODE, ["N", "K", "BLOCK_M", "B_KMAJOR", "USE_TMA"], {"BLOCK_N": 32, "BLOCK_K": 128},
                   {"BLOCK_N": 32, "BLOCK_K": 32})(_grouped_matmul_kernel)
_act_grad = tuned(_ACT_GRAD, ["H", "I", "ROWS_BUCKET"], _DEFAULT, _INTERPRET, 8)(_act_grad_kernel)
_wgrad = tuned(_WGRAD, ["M", "N", "ROWS_BUCKET", "L_GATHER", "R_GATHER"], {"BLOCK_M": 128, "BLOCK_N": 128,
               "BLOCK_S": 64}, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_S": 32}, 8)(_grouped_weight_grad_kernel)


def _persistent_grid(n: int, E: int, N: int, device: torch.device, block_m: int | None = None):
    """Grid of the persistent kernels: about two programs per SM, never more than the tiles
    there can be (sum_e ceil(c_e / BM) <= n / BM + #active experts, times the column tiles)."""
    programs = 2 * num_sms(device)

    def grid(meta):
        bm = block_m or meta["BLOCK_M"]
        return (max(1, min(programs, (triton.cdiv(n, bm) + min(E, n)) * triton.cdiv(N, meta["BLOCK_N"]))),)

    return grid


def _launch(decode, prefill, args: tuple, meta: dict, n: int, E: int, N: int, T: int, device: torch.device) -> None:
    """Launch a persistent kernel over n sorted rows and N columns. Decoding (T <= 64): one row
    tile per active expert (BLOCK_M = next_pow2(T)); otherwise the tuned tiles, keyed by the
    bucket of rows per expert."""
    if T <= DECODE_MAX_TOKENS:
        block_m = pow2(T, 16)
        decode[_persistent_grid(n, E, N, device, block_m)](*args, ROWS_BUCKET=block_m, BLOCK_M=block_m, **meta)
    else:
        prefill[_persistent_grid(n, E, N, device)](*args, ROWS_BUCKET=rows_bucket(n // E), **meta)


def _use_tma(weight: torch.Tensor) -> bool:
    """TMA loads (GAVAMOE_TMA=1) need contiguous weights with 16-byte aligned rows, on a GPU or
    under the interpreter."""
    if not (tma_enabled() and (weight.is_cuda or INTERPRET) and weight.is_contiguous()
            and (weight.shape[-1] * weight.element_size()) % 16 == 0):
        return False
    set_tma_allocator(weight.device)
    return True


def _combine(src, slot_pos, weights, T: int, k: int, out: torch.Tensor) -> torch.Tensor:
    H = src.shape[1]
    block_t, block_h = 16, min(128, pow2(H, 16))
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        src, src.stride(0), slot_pos, weights if weights is not None else src, out, out.stride(0),
        T, H, k, HAS_WEIGHT=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


def _sorted_matmul(a, b, b_strides, b_kmajor: bool, counts, E: int, T: int, N: int, K: int) -> torch.Tensor:
    """out[r] = a[r] @ B_e for sorted rows, in a's dtype; B_e read through b_strides = (expert, k, n)."""
    n = a.shape[0]
    out = torch.empty((n, N), device=a.device, dtype=a.dtype)
    args = (a, a.stride(0), a.stride(1), b, *b_strides, out, out.stride(0), counts)
    common = dict(N=N, K=K, E=E, PRECISION=precision(a.dtype), USE_TMA=_use_tma(b), B_KMAJOR=b_kmajor,
                  BLOCK_E=pow2(E), GROUP_M=GROUP_M)
    _launch(_mm_decode, _mm_prefill, args, common, n, E, N, T, a.device)
    return out


def experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward: bool,
                metadata=routing_metadata):
    """(y [T,H], pre_act [n,2I] or [0,2I], sorted_slots, slot_pos, counts); same contract as torch_impl.
    ``metadata(topk_ids, E)`` sorts the token-slots (the cuda backend passes its own kernel)."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    n = T * k
    sorted_slots, slot_pos, counts = metadata(topk_ids, E)
    y = torch.empty((T, H), device=hidden.device, dtype=hidden.dtype)
    pre_act = torch.empty((n if save_for_backward else 0, two_i), device=hidden.device, dtype=hidden.dtype)
    if T == 0:
        return y, pre_act, sorted_slots, slot_pos, counts
    act = torch.empty((n, I), device=hidden.device, dtype=hidden.dtype)
    up_args = (
        hidden, hidden.stride(0), hidden.stride(1),
        w_gate_up, *w_gate_up.stride(),
        pre_act if save_for_backward else act, pre_act.stride(0) if save_for_backward else 0,
        act, act.stride(0),
        sorted_slots, counts,
    )
    up_meta = dict(H=H, I=I, E=E, TOP_K=k, STORE_PRE=save_for_backward, PRECISION=precision(hidden.dtype),
                   USE_TMA=_use_tma(w_gate_up), BLOCK_E=pow2(E), GROUP_M=GROUP_M)
    _launch(_up_decode, _up_prefill, up_args, up_meta, n, E, I, T, hidden.device)
    # w_down[e] is [H, I]: read as B = Wd_e.T of shape [I, H], K (= I) contiguous
    out = _sorted_matmul(act, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), True,
                         counts, E, T, N=H, K=I)
    _combine(out, slot_pos, topk_weights.contiguous().reshape(-1), T, k, y)
    return y, pre_act, sorted_slots, slot_pos, counts


def experts_bwd(d_y, hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts):
    """(d_hidden [T,H], d_topk_weights [T,k], d_w_gate_up [E,2I,H], d_w_down [E,H,I]), each in
    its input's dtype, the gradients of hidden and the weights contiguous."""
    T, H = hidden.shape
    k = topk_weights.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    n = T * k
    dev, dt = hidden.device, hidden.dtype
    if T == 0:
        return (torch.empty((0, H), device=dev, dtype=dt), torch.empty_like(topk_weights),
                torch.zeros(w_gate_up.shape, device=dev, dtype=dt), torch.zeros(w_down.shape, device=dev, dtype=dt))
    d_y = d_y.to(dt)
    weights = topk_weights.contiguous().reshape(-1)
    prec = precision(dt)
    block_e = pow2(E)
    bucket = rows_bucket(n // E)
    d_pre = torch.empty((n, two_i), device=dev, dtype=dt)
    wact = torch.empty((n, I), device=dev, dtype=dt)
    dw_part = torch.zeros((n, triton.cdiv(I, ACT_GRAD_MIN_BLOCK_N)), device=dev, dtype=torch.float32)
    _act_grad[_persistent_grid(n, E, I, dev)](
        d_y, d_y.stride(0), d_y.stride(1),
        w_down, *w_down.stride(),
        pre_act, pre_act.stride(0), weights,
        d_pre, d_pre.stride(0), wact, wact.stride(0), dw_part, dw_part.stride(0),
        sorted_slots, counts,
        H, I, E, k, bucket,
        PRECISION=prec, BLOCK_E=block_e, GROUP_M=GROUP_M,
    )
    d_weights = dw_part.sum(dim=1).view(T, k).to(topk_weights.dtype)

    def weight_grad(left, l_gather, right, r_gather, shape):
        out = torch.empty(shape, device=dev, dtype=dt)
        M, N = shape[1:]
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), E)
        _wgrad[grid](
            left, left.stride(0), left.stride(1),
            right, right.stride(0), right.stride(1),
            out, *out.stride(),
            sorted_slots, counts,
            M, N, E, k, bucket,
            L_GATHER=l_gather, R_GATHER=r_gather, PRECISION=prec, BLOCK_E=block_e,
        )
        return out

    d_w_down = weight_grad(d_y, True, wact, False, (E, H, I))
    d_w_gate_up = weight_grad(d_pre, False, hidden, True, (E, two_i, H))
    # w_gate_up[e] is [2I, H] = B of shape [K = 2I, N = H], N contiguous
    d_x_slots = _sorted_matmul(d_pre, w_gate_up, (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)),
                               False, counts, E, T, N=H, K=two_i)
    d_hidden = _combine(d_x_slots, slot_pos, None, T, k, torch.empty((T, H), device=dev, dtype=dt))
    return d_hidden, d_weights, d_w_gate_up, d_w_down
