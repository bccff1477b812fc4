"""Triton kernels for diagonal Gaussian-mixture log-responsibilities, forward and backward.

Forward: direct form (z - mu)^2 / var accumulated in fp32 over D in chunks: no (N, K, D)
tensor in memory and no cancellation. Components are visited in tiles with an online
log-sum-exp (a tile of impossible components, all log p = -inf, adds nothing), so K is
unbounded. A row whose every log p is -inf in fp32 (its Mahalanobis sums overflow, z near
1e20) is computed again with the differences scaled by 2^-62: its log-density stays -inf, as
in float64 cast to fp32, and its responsibilities are the scaled log-softmax (the nearest
component gets 1), as the float64 torch backend gives them. Only every log_pi = -inf leaves
0/0: NaN responsibilities, log-density -inf, on every backend.

Backward, with r[n] = sum_c g[n,c] - g_norm[n] from ops.py and a = g - gamma * r fused in:
    dz[n,d]   = -sum_c a (z - mu) iv                       (direct form, per row tile)
    S[c]      = sum_n a,  M1[c,d] = sum_n a (z - mu),  M2[c,d] = sum_n a (z - mu)^2
The moments are three tl.dot per row tile on centred data (zc = z - centre, muc = mu - centre)
when the expansion keeps its digits (muc^2 / var <= EXPANSION_LIMIT over the component
tile), else the direct form; partial sums per row chunk are added in a fixed order
(deterministic, no atomics). ops-level: dmu = iv M1, dlogvar = -0.5 (S - iv M2), dlog_pi = S.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton import INTERPRET, pow2, row_chunks

LOG_2PI = math.log(2 * math.pi)
EXPANSION_LIMIT = 16.0  # largest muc^2 / var for which the moments are taken as dots


@triton.jit
def _mahalanobis(
    z_ptr, stride_zn, stride_zd, rn64, n_mask,  # z rows [BN] of [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd, rk, k_mask,  # components [BK] of [K, D] fp32
    D, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """maha[n, c] = sum_d ((z[n,d] - mu[c,d]) * SCALE)^2 * iv[c,d] in fp32; [BN, BK]."""
    maha = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_mask = rd < D
        z = tl.load(z_ptr + rn64[:, None] * stride_zn + rd[None, :] * stride_zd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
        p_mask = k_mask[:, None] & d_mask[None, :]
        mu = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0)  # [BK, BD]
        iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
        diff = (z[:, None, :] - mu[None, :, :]) * SCALE  # [BN, BK, BD]
        maha += tl.sum(diff * diff * iv[None, :, :], axis=2)
    return maha


@triton.jit
def _gmm_logprob_fwd_kernel(
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # mu, 1/var: [K, D] fp32 (same strides)
    const_ptr,  # log_pi - 0.5 (D log 2pi + sum_d logvar): [K] fp32
    out_ptr, stride_on,  # out log_gamma: [N, K] fp32
    lse_ptr,  # out log_norm: [N] fp32
    N, K, D,
    SINGLE_TILE: tl.constexpr,  # K <= BLOCK_K: log p stays in registers, no write and read-back
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """log p[n,c] = const[c] - 0.5 * sum_d (z[n,d] - mu[c,d])^2 * iv[c,d];
    lse[n] = logsumexp_c log p[n,c];  out[n,c] = log p[n,c] - lse[n].
    One program = BLOCK_N rows, all K (in tiles, online log-sum-exp)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    log_p = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)  # [BN, BK]: the last (with SINGLE_TILE, only) tile
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        maha = _mahalanobis(z_ptr, stride_zn, stride_zd, rn64, n_mask, mu_ptr, iv_ptr, stride_pk, stride_pd,
                            rk, k_mask, D, 1.0, BLOCK_N, BLOCK_K, BLOCK_D)
        const = tl.load(const_ptr + rk, mask=k_mask, other=0.0)
        log_p = tl.where(k_mask[None, :], const[None, :] - 0.5 * maha, float("-inf"))
        if not SINGLE_TILE:
            tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :], log_p,
                     mask=n_mask[:, None] & k_mask[None, :])
        new_max = tl.maximum(run_max, tl.max(log_p, axis=1))
        # nothing finite yet: shift by 0, so exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(log_p - shift[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rn64, lse, mask=n_mask)
    # rows with no finite log p: overflowed in fp32 (rescued below) or every log_pi = -inf (NaN)
    lost = (run_max == float("-inf")) & n_mask
    lost_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    scaled = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    if tl.max(lost.to(tl.int32), axis=0) > 0:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            maha = _mahalanobis(z_ptr, stride_zn, stride_zd, rn64, lost, mu_ptr, iv_ptr, stride_pk, stride_pd,
                                rk, k_mask, D, 2.0**-62, BLOCK_N, BLOCK_K, BLOCK_D)  # maha * 2^-124
            const = tl.load(const_ptr + rk, mask=k_mask, other=0.0)
            scaled = tl.where(k_mask[None, :], const[None, :] * 2.0**-124 - 0.5 * maha, float("-inf"))
            if not SINGLE_TILE:
                tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :], scaled,
                         mask=lost[:, None] & k_mask[None, :])
            lost_max = tl.maximum(lost_max, tl.max(scaled, axis=1))
    # 2^124 back in two finite steps (2^128 is not an fp32 number): 0 stays 0, the rest -> -inf
    if SINGLE_TILE:
        rk = tl.arange(0, BLOCK_K)
        rescued = (scaled - lost_max[:, None]) * 2.0**62 * 2.0**62
        tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :],
                 tl.where(lost[:, None], rescued, log_p - lse[:, None]), mask=n_mask[:, None] & (rk < K)[None, :])
    else:
        tl.debug_barrier()  # the log p written above is read back by this program
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ptrs = out_ptr + rn64[:, None] * stride_on + rk[None, :]
            mask = n_mask[:, None] & (rk < K)[None, :]
            v = tl.load(ptrs, mask=mask, other=0.0)
            rescued = (v - lost_max[:, None]) * 2.0**62 * 2.0**62
            tl.store(ptrs, tl.where(lost[:, None], rescued, v - lse[:, None]), mask=mask)


@triton.jit
def _grad_input(g_ptr, lg_ptr, stride_gn, r_ptr, rn64, n_mask, rk, k_mask):
    """a[n, c] = g[n,c] - gamma[n,c] * r[n] = d loss / d log p[n, c] (0 outside the tile); [BN, BK]."""
    mask = n_mask[:, None] & k_mask[None, :]
    g = tl.load(g_ptr + rn64[:, None] * stride_gn + rk[None, :], mask=mask, other=0.0)
    gamma = tl.exp(tl.load(lg_ptr + rn64[:, None] * stride_gn + rk[None, :], mask=mask, other=float("-inf")))
    r = tl.load(r_ptr + rn64, mask=n_mask, other=0.0)
    return tl.where(mask, g - gamma * r[:, None], 0.0)


@triton.jit
def _gmm_logprob_bwd_z_kernel(
    g_ptr, lg_ptr, stride_gn,  # g = d loss / d log_gamma, log_gamma: [N, K] fp32 (same strides)
    r_ptr,  # per-row term r = sum_c g - g_norm: [N] fp32
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # [K, D] fp32
    dz_ptr, stride_dn,  # out d z: [N, D] contiguous
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz[n,d] = -sum_c a[n,c] (z[n,d] - mu[c,d]) iv[c,d].  Grid: (N tiles, D tiles)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = rn < N
    d_mask = rd < D
    rn64 = rn.to(tl.int64)
    z = tl.load(z_ptr + rn64[:, None] * stride_zn + rd[None, :] * stride_zd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = _grad_input(g_ptr, lg_ptr, stride_gn, r_ptr, rn64, n_mask, rk, k_mask)  # [BN, BK]
        p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
        p_mask = k_mask[:, None] & d_mask[None, :]
        mu = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0)
        iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
        acc -= tl.sum(a[:, :, None] * (z[:, None, :] - mu[None, :, :]) * iv[None, :, :], axis=1)
    tl.store(dz_ptr + rn64[:, None] * stride_dn + rd[None, :], acc.to(dz_ptr.dtype.element_ty),
             mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def _gmm_logprob_bwd_moments_kernel(
    g_ptr, lg_ptr, stride_gn,  # [N, K] fp32
    r_ptr,  # [N] fp32
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    centre_ptr,  # [D] fp32: the mean of the component means
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # [K, D] fp32
    s_ptr, m1_ptr, m2_ptr,  # out partials: [P, K] and [P, K, D] fp32, contiguous
    N, K, D, ROWS_PER_PROGRAM,
    LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SUB_N: tl.constexpr,
):
    """Over the rows of chunk p:  S[p,c] = sum_n a;  M1[p,c,d] = sum_n a (z - mu);
    M2[p,c,d] = sum_n a (z - mu)^2.  Dots of a^T against zc and zc^2, then shifted to mu, when
    max muc^2 iv over the tile <= LIMIT; the direct form otherwise.  Grid: (K tiles, D tiles, P)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    p = tl.program_id(2)
    k_mask = rk < K
    d_mask = rd < D
    p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
    p_mask = k_mask[:, None] & d_mask[None, :]
    centre = tl.load(centre_ptr + rd, mask=d_mask, other=0.0)  # [BD]
    muc = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0) - centre[None, :]  # [BK, BD]
    iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
    acc_s = tl.zeros([BLOCK_K], tl.float32)
    acc_1 = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    acc_2 = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    row0 = p.to(tl.int64) * ROWS_PER_PROGRAM
    well_conditioned = tl.max(tl.max(tl.where(p_mask, muc * muc * iv, 0.0), axis=1), axis=0) <= LIMIT
    if well_conditioned:
        for n0 in range(0, ROWS_PER_PROGRAM, BLOCK_N):
            rn = row0 + n0 + tl.arange(0, BLOCK_N)
            n_mask = (rn < N) & (n0 + tl.arange(0, BLOCK_N) < ROWS_PER_PROGRAM)
            a = _grad_input(g_ptr, lg_ptr, stride_gn, r_ptr, rn, n_mask, rk, k_mask)  # [BN, BK]
            zc = tl.load(z_ptr + rn[:, None] * stride_zn + rd[None, :] * stride_zd,
                         mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) - centre[None, :]
            zc = tl.where(n_mask[:, None] & d_mask[None, :], zc, 0.0)  # [BN, BD]
            acc_s += tl.sum(a, axis=0)
            a_t = tl.trans(a)  # [BK, BN]
            acc_1 = tl.dot(a_t, zc, acc_1, input_precision="ieee")
            acc_2 = tl.dot(a_t, zc * zc, acc_2, input_precision="ieee")
        # sum a (zc - muc)^k from the moments about the centre
        acc_2 = acc_2 - 2.0 * muc * acc_1 + muc * muc * acc_s[:, None]
        acc_1 = acc_1 - muc * acc_s[:, None]
    else:
        for n0 in range(0, ROWS_PER_PROGRAM, SUB_N):  # direct form, SUB_N rows at a time
            rn = row0 + n0 + tl.arange(0, SUB_N)
            n_mask = (rn < N) & (n0 + tl.arange(0, SUB_N) < ROWS_PER_PROGRAM)
            a = _grad_input(g_ptr, lg_ptr, stride_gn, r_ptr, rn, n_mask, rk, k_mask)  # [SN, BK]
            zc = tl.load(z_ptr + rn[:, None] * stride_zn + rd[None, :] * stride_zd,
                         mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) - centre[None, :]
            diff = zc[:, None, :] - muc[None, :, :]  # [SN, BK, BD]
            acc_s += tl.sum(a, axis=0)
            acc_1 += tl.sum(a[:, :, None] * diff, axis=0)
            acc_2 += tl.sum(a[:, :, None] * diff * diff, axis=0)
    out = p.to(tl.int64) * K * D + rk[:, None] * D + rd[None, :]
    tl.store(m1_ptr + out, acc_1, mask=p_mask)
    tl.store(m2_ptr + out, acc_2, mask=p_mask)
    if tl.program_id(1) == 0:
        tl.store(s_ptr + p.to(tl.int64) * K + rk, acc_s, mask=k_mask)


def _blocks(K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D): a [BN, BK, BD] tile of 8K elements with BD = 4 (16-byte
    loads of fp32 z), so a row tile is 64 to 128 rows and the parameters are read once per tile."""
    block_k = min(32, pow2(K, 4)) if K > 16 else pow2(K, 4)
    return min(128, 2048 // block_k), block_k, 4


def prepared_params(log_pi, mu, logvar, D: int):
    """(mu fp32, 1/var fp32, log_pi - 0.5 (D log 2pi + sum_d logvar) fp32), contiguous: what the
    kernels read. 1/var saturates at the largest fp32 instead of inf (logvar < -88), so that a
    difference of exactly 0 gives 0, not 0 * inf = NaN."""
    inv_var = torch.exp(-logvar.float()).clamp_max(torch.finfo(torch.float32).max).contiguous()
    const = (log_pi.float() - 0.5 * (D * LOG_2PI + logvar.float().sum(-1))).contiguous()
    return mu.float().contiguous(), inv_var, const


def log_prob_fwd(z, log_pi, mu, logvar):
    """(log_gamma [N, K] fp32, log_norm [N] fp32)."""
    N, D = z.shape
    K = mu.shape[0]
    log_gamma = torch.empty((N, K), device=z.device, dtype=torch.float32)
    log_norm = torch.empty((N,), device=z.device, dtype=torch.float32)
    if N == 0:
        return log_gamma, log_norm
    mu32, inv_var, const = prepared_params(log_pi, mu, logvar, D)
    block_n, block_k, block_d = _blocks(K)
    _gmm_logprob_fwd_kernel[(triton.cdiv(N, block_n),)](
        z, z.stride(0), z.stride(1),
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        const,
        log_gamma, log_gamma.stride(0),
        log_norm,
        N, K, D,
        SINGLE_TILE=K <= block_k, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return log_gamma, log_norm


def log_prob_bwd(g, row_term, z, log_pi, mu, logvar, log_gamma):
    """(d z, d log_pi, d mu, d logvar), each in its input's dtype; g [N, K] and log_gamma
    contiguous fp32, row_term [N] fp32 = sum_c g - g_norm (ops.py)."""
    N, D = z.shape
    K = mu.shape[0]
    d_z = torch.empty((N, D), device=z.device, dtype=z.dtype)
    if N == 0:
        return d_z, torch.zeros_like(log_pi), torch.zeros_like(mu), torch.zeros_like(logvar)
    mu32, inv_var, _ = prepared_params(log_pi, mu, logvar, D)
    block_n, block_k, block_d = _blocks(K)
    _gmm_logprob_bwd_z_kernel[(triton.cdiv(N, block_n), triton.cdiv(D, block_d))](
        g, log_gamma, g.stride(0),
        row_term,
        z, z.stride(0), z.stride(1),
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        d_z, d_z.stride(0),
        N, K, D,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    # moments: row tiles of 64 for the dots, D in tiles of up to 64; enough row chunks to fill a GPU
    mom_n, mom_k, mom_d = (16, 16, 16) if INTERPRET else (64, min(32, pow2(K, 16)), min(64, pow2(D, 16)))
    centre = mu32.mean(0).contiguous()
    tiles = triton.cdiv(K, mom_k) * triton.cdiv(D, mom_d)
    chunks, rows_per_program = row_chunks(N, mom_n, tiles, z.device, programs=1024, cpu_chunks=4)
    s = torch.empty((chunks, K), device=z.device, dtype=torch.float32)
    m1 = torch.empty((chunks, K, D), device=z.device, dtype=torch.float32)
    m2 = torch.empty_like(m1)
    _gmm_logprob_bwd_moments_kernel[(triton.cdiv(K, mom_k), triton.cdiv(D, mom_d), chunks)](
        g, log_gamma, g.stride(0),
        row_term,
        z, z.stride(0), z.stride(1),
        centre,
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        s, m1, m2,
        N, K, D, rows_per_program,
        LIMIT=EXPANSION_LIMIT, BLOCK_N=mom_n, BLOCK_K=mom_k, BLOCK_D=mom_d,
        SUB_N=max(1, 4096 // (mom_k * mom_d)),
    )
    s_all, m1_all, m2_all = s.sum(0), m1.sum(0), m2.sum(0)
    d_mu = inv_var * m1_all
    d_logvar = -0.5 * (s_all[:, None] - inv_var * m2_all)
    return d_z, s_all.to(log_pi.dtype), d_mu.to(mu.dtype), d_logvar.to(logvar.dtype)
