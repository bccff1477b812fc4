"""Triton grouped GEMMs for SwiGLU experts over token-slots sorted by expert.

Rows of every GEMM are token-slots in expert order (see torch_impl.py for the layout). A
program owns BLOCK_M consecutive sorted rows of one expert; which expert is found from the
per-expert counts inside the kernel, so the launch grid is an upper bound known from shapes
alone (no host sync) and surplus programs return at once. Rows of hidden and d_y are
gathered while the tile loads: no permuted copy of them exists in memory.

Forward:  h = x[tok] @ Wgu_e.T  -> act = silu(g) * u  (epilogue)  -> out = act @ Wd_e.T
          -> y[t] = sum_j w[t,j] * out[pos(t,j)]  (per-token gather-and-sum, no atomics)
Backward: d_act' = d_y[tok] @ Wd_e;  d_w = sum(d_act' * act);  d_h = dSwiGLU(w * d_act')
          dWd_e = sum_r (w d_y[tok])^T act,  dWgu_e = sum_r d_h^T x[tok],  dx = sum_j (d_h @ Wgu_e)

Decoding (T <= 64): BLOCK_M = next_pow2(T) >= the rows of any expert, so one row tile per
active expert and each active expert's weights are read once.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from .routing import _pow2, routing_metadata

INTERPRET = triton_interpret()
DECODE_MAX_TOKENS = 64


@triton.jit
def _expert_tile(counts_ptr, pid_m, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile pid_m -> (expert, first sorted row, end of the expert's rows).
    Tiles are numbered expert by expert, ceil(count_e / BLOCK_M) each; expert == E past the end."""
    re = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + re, mask=re < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = re == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    expert_row0 = tl.sum(tl.where(mine, tl.cumsum(counts, 0) - counts, 0), 0)
    row_end = expert_row0 + tl.sum(tl.where(mine, counts, 0), 0)
    return expert, expert_row0 + (pid_m - first_tile) * BLOCK_M, row_end


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
def _up_swiglu_fwd_kernel(
    x_ptr, stride_xt, stride_xh,  # hidden: [T, H]
    w_ptr, stride_we, stride_wn, stride_wh,  # w_gate_up: [E, 2I, H]
    h_ptr, stride_hm,  # out h = [g | u]: [n, 2I] sorted (written if STORE_H)
    act_ptr, stride_am,  # out act = silu(g) * u: [n, I] sorted
    sorted_slots_ptr, counts_ptr,  # [n], [E]
    H, I, E, TOP_K,
    STORE_H: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """g = x[tok] @ Wgu_e[:I].T,  u = x[tok] @ Wgu_e[I:].T,  act = silu(g) * u.
    One program = BLOCK_M sorted rows of one expert x BLOCK_N of I; x rows gathered on load."""
    expert, row0, row_end = _expert_tile(counts_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    m_mask = rm < row_end
    rm64 = rm.to(tl.int64)
    token = (tl.load(sorted_slots_ptr + rm64, mask=m_mask, other=0) // TOP_K).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < I
    w_gate = w_ptr + expert.to(tl.int64) * stride_we
    w_up = w_gate + I * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < H
        x = tl.load(x_ptr + token[:, None] * stride_xt + rk[None, :] * stride_xh,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w_off = rk[:, None] * stride_wh + rn[None, :] * stride_wn
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.dot(x, tl.load(w_gate + w_off, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
        up = tl.dot(x, tl.load(w_up + w_off, mask=w_mask, other=0.0), up, input_precision=PRECISION)
    act = gate * tl.sigmoid(gate) * up
    out_mask = m_mask[:, None] & n_mask[None, :]
    if STORE_H:
        h_rows = h_ptr + rm64[:, None] * stride_hm + rn[None, :]
        tl.store(h_rows, gate.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_rows + I, up.to(h_ptr.dtype.element_ty), mask=out_mask)
    tl.store(act_ptr + rm64[:, None] * stride_am + rn[None, :], act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_matmul_kernel(
    a_ptr, stride_am, stride_ak,  # A: [n, K] sorted
    b_ptr, stride_be, stride_bk, stride_bn,  # B: per expert [K, N] through strides
    c_ptr, stride_cm,  # C out: [n, N] sorted
    counts_ptr,  # [E]
    N, K, E,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """C[r] = A[r] @ B_e for the sorted rows r of expert e (down projection; d_h @ Wgu_e)."""
    expert, row0, row_end = _expert_tile(counts_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rm = row0 + tl.arange(0, BLOCK_M)
    m_mask = rm < row_end
    rm64 = rm.to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc = _rows_matmul(a_ptr, rm64, m_mask, stride_am, stride_ak,
                       b_ptr + expert.to(tl.int64) * stride_be, stride_bk, stride_bn, rn, n_mask,
                       K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_swiglu_bwd_kernel(
    dy_ptr, stride_dyt, stride_dyh,  # d_y: [T, H]
    w_ptr, stride_we, stride_wh, stride_wi,  # w_down: [E, H, I]
    h_ptr, stride_hm,  # saved h = [g | u]: [n, 2I] sorted
    tw_ptr,  # topk weights, flat by slot: [n]
    dh_ptr, stride_dhm,  # out d_h: [n, 2I] sorted
    act_ptr, stride_am,  # out act (recomputed): [n, I] sorted
    dw_part_ptr, stride_dwm,  # out partial d_w by slot: [n, cdiv(I, BLOCK_N)] fp32
    sorted_slots_ptr, counts_ptr,
    H, I, E, TOP_K,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d_act' = d_y[tok] @ Wd_e (the unweighted expert output's gradient);  act = silu(g) * u;
    d_w partial = sum_n d_act' * act;  d_g = w d_act' u silu'(g);  d_u = w d_act' silu(g)."""
    expert, row0, row_end = _expert_tile(counts_ptr, tl.program_id(0), E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    pid_n = tl.program_id(1)
    rm = row0 + tl.arange(0, BLOCK_M)
    m_mask = rm < row_end
    rm64 = rm.to(tl.int64)
    slot = tl.load(sorted_slots_ptr + rm64, mask=m_mask, other=0).to(tl.int64)
    token = slot // TOP_K
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < I
    d_act = _rows_matmul(dy_ptr, token, m_mask, stride_dyt, stride_dyh,
                         w_ptr + expert.to(tl.int64) * stride_we, stride_wh, stride_wi, rn, n_mask,
                         H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # [BM, BN]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    h_rows = h_ptr + rm64[:, None] * stride_hm + rn[None, :]
    gate = tl.load(h_rows, mask=mn_mask, other=0.0).to(tl.float32)
    up = tl.load(h_rows + I, mask=mn_mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    tl.store(dw_part_ptr + slot * stride_dwm + pid_n, tl.sum(tl.where(mn_mask, d_act * act, 0.0), axis=1),
             mask=m_mask)
    d_act = d_act * tl.load(tw_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
    dh_rows = dh_ptr + rm64[:, None] * stride_dhm + rn[None, :]
    tl.store(dh_rows, d_gate.to(dh_ptr.dtype.element_ty), mask=mn_mask)
    tl.store(dh_rows + I, (d_act * silu).to(dh_ptr.dtype.element_ty), mask=mn_mask)
    tl.store(act_ptr + rm64[:, None] * stride_am + rn[None, :], act.to(act_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _grouped_weight_grad_kernel(
    l_ptr, stride_lr, stride_lm,  # left rows: [*, M] (gathered by token if L_GATHER, else sorted)
    r_ptr, stride_rr, stride_rn,  # right rows: [*, N] (gathered by token if R_GATHER, else sorted)
    scale_ptr,  # per-slot scale of the left rows: [n] (if HAS_SCALE)
    out_ptr, stride_oe, stride_om, stride_on,  # out: [E, M, N]
    sorted_slots_ptr, counts_ptr,
    M, N, E, TOP_K,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[e] = sum_{sorted rows r of e} (scale_r * L[row_l(r)])^T R[row_r(r)];  [M, N] per expert.
    Grid: (M blocks, N blocks, E); experts with no rows get zeros."""
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
        if HAS_SCALE:
            scale = tl.load(scale_ptr + slot, mask=s_mask, other=0.0).to(tl.float32)
            left = (left.to(tl.float32) * scale[:, None]).to(l_ptr.dtype.element_ty)
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
    y_ptr, stride_yt,  # out: [T, H]
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


# Block sizes: autotuned on a GPU; fixed and small under the interpreter, which has no autotune.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_S": 32}
_BWD_BLOCK_N = 64  # fixed: the number of partial d_w columns depends on it


def _configs(names: tuple[str, ...], **choices) -> list[triton.Config]:
    out = []
    for values in itertools.product(*(choices[n] for n in names)):
        meta = dict(zip(names, values, strict=True))
        warps = 8 if meta.get("BLOCK_M", 64) * meta.get("BLOCK_N", 64) >= 128 * 128 else 4
        out.extend(triton.Config(meta, num_warps=warps, num_stages=s) for s in (3, 4))
    return out


def _tuned(configs: list, key: list[str]):
    def wrap(fn):
        return fn if INTERPRET else triton.autotune(configs=configs, key=key)(fn)

    return wrap


_PREFILL = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), BLOCK_M=(64, 128), BLOCK_N=(64, 128), BLOCK_K=(32, 64))
_DECODE = _configs(("BLOCK_N", "BLOCK_K"), BLOCK_N=(32, 64, 128), BLOCK_K=(64, 128))
_KEY = ["N", "K"]
_up_prefill = _tuned(_PREFILL, ["H", "I"])(_up_swiglu_fwd_kernel)
_up_decode = _tuned(_DECODE, ["H", "I", "BLOCK_M"])(_up_swiglu_fwd_kernel)
_mm_prefill = _tuned(_PREFILL, _KEY)(_grouped_matmul_kernel)
_mm_decode = _tuned(_DECODE, [*_KEY, "BLOCK_M"])(_grouped_matmul_kernel)
_down_bwd = _tuned(_configs(("BLOCK_M", "BLOCK_K"), BLOCK_M=(64, 128), BLOCK_K=(32, 64)), ["H", "I"])(
    _down_swiglu_bwd_kernel
)
_wgrad = _tuned(
    _configs(("BLOCK_M", "BLOCK_N", "BLOCK_S"), BLOCK_M=(64, 128), BLOCK_N=(64, 128), BLOCK_S=(32, 64)),
    ["M", "N", "L_GATHER", "R_GATHER"],
)(_grouped_weight_grad_kernel)


def _launch(kernel, grid, *args, tuned: tuple[str, ...], **kwargs):
    """Launch ``kernel``; the meta-parameters in ``tuned`` come from the autotuner on a GPU and
    from _INTERPRET_BLOCKS under the interpreter."""
    if INTERPRET:
        meta = {name: _INTERPRET_BLOCKS[name] for name in tuned}
        kernel[grid({**kwargs, **meta})](*args, **kwargs, **meta)
    else:
        kernel[grid](*args, **kwargs)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (no tf32), as torch.matmul does by default
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_tiles(n: int, E: int):
    """Upper bound on row tiles: sum_e ceil(c_e / BM) <= n / BM + #active experts."""
    return lambda meta: triton.cdiv(n, meta["BLOCK_M"]) + min(E, n)


def _combine(src, slot_pos, weights, T: int, k: int, out: torch.Tensor) -> torch.Tensor:
    H = src.shape[1]
    block_t, block_h = 16, min(128, _pow2(H, 16))
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        src, src.stride(0), slot_pos, weights if weights is not None else src, out, out.stride(0),
        T, H, k, HAS_WEIGHT=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


def _sorted_matmul(a, b, b_strides, counts, E: int, T: int, N: int, K: int, out_dtype) -> torch.Tensor:
    """out[r] = a[r] @ B_e for sorted rows; B_e read through b_strides = (expert, k, n)."""
    n = a.shape[0]
    out = torch.empty((n, N), device=a.device, dtype=out_dtype)
    common = dict(N=N, K=K, E=E, PRECISION=_precision(a.dtype), BLOCK_E=_pow2(E))
    args = (a, a.stride(0), a.stride(1), b, *b_strides, out, out.stride(0), counts)
    tiles = _row_tiles(n, E)
    if T <= DECODE_MAX_TOKENS:
        grid = lambda meta: (tiles(meta), triton.cdiv(N, meta["BLOCK_N"]))
        _launch(_mm_decode, grid, *args, tuned=("BLOCK_N", "BLOCK_K"), BLOCK_M=_pow2(T, 16), **common)
    else:
        grid = lambda meta: (tiles(meta), triton.cdiv(N, meta["BLOCK_N"]))
        _launch(_mm_prefill, grid, *args, tuned=("BLOCK_M", "BLOCK_N", "BLOCK_K"), **common)
    return out


def experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward: bool,
                metadata=routing_metadata):
    """(y [T,H], h [n,2I] or [0,2I], sorted_slots, slot_pos, counts); same contract as torch_impl.
    ``metadata(topk_ids, E)`` sorts the token-slots (the cuda backend passes its own kernel)."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    n = T * k
    sorted_slots, slot_pos, counts = metadata(topk_ids, E)
    y = torch.empty_like(hidden)
    h = torch.empty((n if save_for_backward else 0, two_i), device=hidden.device, dtype=hidden.dtype)
    if T == 0:
        return y, h, sorted_slots, slot_pos, counts
    act = torch.empty((n, I), device=hidden.device, dtype=hidden.dtype)
    up_args = (
        hidden, hidden.stride(0), hidden.stride(1),
        w_gate_up, *w_gate_up.stride(),
        h if save_for_backward else act, h.stride(0) if save_for_backward else 0,
        act, act.stride(0),
        sorted_slots, counts,
    )
    up_meta = dict(H=H, I=I, E=E, TOP_K=k, STORE_H=save_for_backward, PRECISION=_precision(hidden.dtype),
                   BLOCK_E=_pow2(E))
    tiles = _row_tiles(n, E)
    grid = lambda meta: (tiles(meta), triton.cdiv(I, meta["BLOCK_N"]))
    if T <= DECODE_MAX_TOKENS:
        _launch(_up_decode, grid, *up_args, tuned=("BLOCK_N", "BLOCK_K"), BLOCK_M=_pow2(T, 16), **up_meta)
    else:
        _launch(_up_prefill, grid, *up_args, tuned=("BLOCK_M", "BLOCK_N", "BLOCK_K"), **up_meta)
    # w_down[e] is [H, I]; read as B = Wd_e.T of shape [I, H]
    out = _sorted_matmul(act, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)),
                         counts, E, T, N=H, K=I, out_dtype=hidden.dtype)
    _combine(out, slot_pos, topk_weights.contiguous().reshape(-1), T, k, y)
    return y, h, sorted_slots, slot_pos, counts


def experts_bwd(d_y, hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts):
    """(d_hidden [T,H], d_topk_weights [T,k], d_w_gate_up [E,2I,H], d_w_down [E,H,I])."""
    T, H = hidden.shape
    k = topk_weights.shape[1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    n = T * k
    dev, dt = hidden.device, hidden.dtype
    d_y = d_y.to(dt)
    if T == 0:
        return (torch.empty_like(hidden), torch.empty_like(topk_weights),
                torch.zeros_like(w_gate_up), torch.zeros_like(w_down))
    weights = topk_weights.contiguous().reshape(-1)
    precision = _precision(dt)
    block_e = _pow2(E)
    d_h = torch.empty((n, two_i), device=dev, dtype=dt)
    act = torch.empty((n, I), device=dev, dtype=dt)
    dw_part = torch.empty((n, triton.cdiv(I, _BWD_BLOCK_N)), device=dev, dtype=torch.float32)
    tiles = _row_tiles(n, E)
    _launch(
        _down_bwd, lambda meta: (tiles(meta), triton.cdiv(I, _BWD_BLOCK_N)),
        d_y, d_y.stride(0), d_y.stride(1),
        w_down, *w_down.stride(),
        h, h.stride(0), weights,
        d_h, d_h.stride(0), act, act.stride(0), dw_part, dw_part.stride(0),
        sorted_slots, counts,
        tuned=("BLOCK_M", "BLOCK_K"),
        H=H, I=I, E=E, TOP_K=k, PRECISION=precision, BLOCK_N=_BWD_BLOCK_N, BLOCK_E=block_e,
    )
    d_weights = dw_part.sum(dim=1).view(T, k).to(topk_weights.dtype)

    def weight_grad(left, l_gather, right, r_gather, scale, out):
        M, N = out.shape[1:]
        _launch(
            _wgrad, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), E),
            left, left.stride(0), left.stride(1),
            right, right.stride(0), right.stride(1),
            scale if scale is not None else left,
            out, *out.stride(),
            sorted_slots, counts,
            tuned=("BLOCK_M", "BLOCK_N", "BLOCK_S"),
            M=M, N=N, E=E, TOP_K=k, L_GATHER=l_gather, R_GATHER=r_gather, HAS_SCALE=scale is not None,
            PRECISION=precision, BLOCK_E=block_e,
        )
        return out

    d_w_down = weight_grad(d_y, True, act, False, weights, torch.empty_like(w_down))
    d_w_gate_up = weight_grad(d_h, False, hidden, True, None, torch.empty_like(w_gate_up))
    d_x_slots = _sorted_matmul(d_h, w_gate_up, (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)),
                               counts, E, T, N=H, K=two_i, out_dtype=torch.float32)
    d_hidden = _combine(d_x_slots, slot_pos, None, T, k, torch.empty_like(hidden))
    return d_hidden, d_weights, d_w_gate_up, d_w_down
