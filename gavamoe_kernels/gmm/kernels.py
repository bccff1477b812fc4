"""Triton kernels for diagonal Gaussian-mixture log-responsibilities, forward and backward.

Direct form (z - mu)^2 / var, accumulated in fp32 over D in blocks: no (N, K, D) tensor in
memory and no cancellation. Components are visited in blocks with an online log-sum-exp,
so K is unbounded. The parameter gradients are reduced over rows in a fixed order, as
per-chunk partial sums added up afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from .reference import LOG_2PI
from .torch_impl import log_prob_grad_input

INTERPRET = triton_interpret()


@triton.jit
def _gmm_logprob_fwd_kernel(
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # mu, 1/var: [K, D] fp32 (same strides)
    const_ptr,  # log_pi - 0.5 (D log 2pi + sum_d logvar): [K] fp32
    out_ptr, stride_on,  # out log_gamma: [N, K] fp32
    lse_ptr,  # out log_norm: [N] fp32
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """log p[n,c] = const[c] - 0.5 * sum_d (z[n,d] - mu[c,d])^2 * iv[c,d];
    lse[n] = logsumexp_c log p[n,c];  out[n,c] = log p[n,c] - lse[n].
    One program = BLOCK_N rows, all K (in blocks, online log-sum-exp)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        maha = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # [BN, BK]
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_mask = rd < D
            z = tl.load(z_ptr + rn64[:, None] * stride_zn + rd[None, :] * stride_zd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
            p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
            p_mask = k_mask[:, None] & d_mask[None, :]
            mu = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0)  # [BK, BD]
            iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
            diff = z[:, None, :] - mu[None, :, :]  # [BN, BK, BD]
            maha += tl.sum(diff * diff * iv[None, :, :], axis=2)
        const = tl.load(const_ptr + rk, mask=k_mask, other=0.0)
        log_p = tl.where(k_mask[None, :], const[None, :] - 0.5 * maha, float("-inf"))
        tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :], log_p, mask=n_mask[:, None] & k_mask[None, :])
        new_max = tl.maximum(run_max, tl.max(log_p, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(log_p - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rn64, lse, mask=n_mask)
    tl.debug_barrier()  # the unnormalised log p written above is read back by this program
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = out_ptr + rn64[:, None] * stride_on + rk[None, :]
        mask = n_mask[:, None] & (rk < K)[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) - lse[:, None], mask=mask)


@triton.jit
def _gmm_logprob_bwd_z_kernel(
    a_ptr, stride_an,  # a = d loss / d log p: [N, K] fp32
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # [K, D] fp32
    dz_ptr, stride_dn, stride_dd,  # out d z: [N, D]
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz[n,d] = -sum_c a[n,c] (z[n,d] - mu[c,d]) iv[c,d].  Grid: (N blocks, D blocks)."""
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
        a = tl.load(a_ptr + rn64[:, None] * stride_an + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BN, BK]
        p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
        p_mask = k_mask[:, None] & d_mask[None, :]
        mu = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0)
        iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
        acc -= tl.sum(a[:, :, None] * (z[:, None, :] - mu[None, :, :]) * iv[None, :, :], axis=1)
    tl.store(dz_ptr + rn64[:, None] * stride_dn + rd[None, :] * stride_dd, acc.to(dz_ptr.dtype.element_ty),
             mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def _gmm_logprob_bwd_params_kernel(
    a_ptr, stride_an,  # a: [N, K] fp32
    z_ptr, stride_zn, stride_zd,  # z: [N, D]
    mu_ptr, iv_ptr, stride_pk, stride_pd,  # [K, D] fp32
    dmu_ptr, dlv_ptr,  # out partials: [P, K, D] fp32 each, contiguous
    N, K, D, ROWS_PER_PROGRAM,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Over the rows of chunk p:  dmu[p,c,d] = sum_n a (z - mu) iv;
    dlv[p,c,d] = -0.5 sum_n a (1 - (z - mu)^2 iv).  Grid: (K blocks, D blocks, P)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    p = tl.program_id(2)
    k_mask = rk < K
    d_mask = rd < D
    p_off = rk[:, None] * stride_pk + rd[None, :] * stride_pd
    p_mask = k_mask[:, None] & d_mask[None, :]
    mu = tl.load(mu_ptr + p_off, mask=p_mask, other=0.0)  # [BK, BD]
    iv = tl.load(iv_ptr + p_off, mask=p_mask, other=0.0)
    acc_mu = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    acc_lv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    row0 = p.to(tl.int64) * ROWS_PER_PROGRAM
    for n0 in range(0, ROWS_PER_PROGRAM, BLOCK_N):
        rn = row0 + n0 + tl.arange(0, BLOCK_N)
        n_mask = (rn < N) & (n0 + tl.arange(0, BLOCK_N) < ROWS_PER_PROGRAM)
        a = tl.load(a_ptr + rn[:, None] * stride_an + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BN, BK]
        z = tl.load(z_ptr + rn[:, None] * stride_zn + rd[None, :] * stride_zd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        scaled = (z[:, None, :] - mu[None, :, :]) * iv[None, :, :]  # [BN, BK, BD]: (z - mu) / var
        acc_mu += tl.sum(a[:, :, None] * scaled, axis=0)
        acc_lv += tl.sum(a[:, :, None] * (1.0 - scaled * (z[:, None, :] - mu[None, :, :])), axis=0)
    out = p.to(tl.int64) * K * D + rk[:, None] * D + rd[None, :]
    tl.store(dmu_ptr + out, acc_mu, mask=p_mask)
    tl.store(dlv_ptr + out, -0.5 * acc_lv, mask=p_mask)


def _blocks(K: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D): the [BN, BK, BD] tile stays near 8K elements."""
    block_k = min(16, triton.next_power_of_2(K))
    block_d = min(64, triton.next_power_of_2(D))
    block_n = max(1, min(64, 8192 // (block_k * block_d)))
    return block_n, block_k, block_d


def prepared_params(log_pi, mu, logvar, D: int):
    """(mu fp32, 1/var fp32, log_pi - 0.5 (D log 2pi + sum_d logvar) fp32), contiguous: what the kernels read."""
    inv_var = torch.exp(-logvar.float()).contiguous()
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
    block_n, block_k, block_d = _blocks(K, D)
    _gmm_logprob_fwd_kernel[(triton.cdiv(N, block_n),)](
        z, z.stride(0), z.stride(1),
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        const,
        log_gamma, log_gamma.stride(0),
        log_norm,
        N, K, D,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return log_gamma, log_norm


def log_prob_bwd(g, g_norm, z, log_pi, mu, logvar, log_gamma):
    """(d z, d log_pi, d mu, d logvar) in the inputs' dtypes."""
    N, D = z.shape
    K = mu.shape[0]
    a = log_prob_grad_input(g, g_norm, log_gamma).contiguous()  # [N, K]
    d_z = torch.empty_like(z)
    if N == 0:
        return d_z, torch.zeros_like(log_pi), torch.zeros_like(mu), torch.zeros_like(logvar)
    mu32, inv_var, _ = prepared_params(log_pi, mu, logvar, D)
    block_n, block_k, block_d = _blocks(K, D)
    _gmm_logprob_bwd_z_kernel[(triton.cdiv(N, block_n), triton.cdiv(D, block_d))](
        a, a.stride(0),
        z, z.stride(0), z.stride(1),
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        d_z, d_z.stride(0), d_z.stride(1),
        N, K, D,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    # enough row chunks to fill a GPU; each walks its rows in order
    chunks = max(1, min(1024 if z.is_cuda else 8, triton.cdiv(N, 4 * block_n)))
    rows_per_program = triton.cdiv(triton.cdiv(N, chunks), block_n) * block_n
    chunks = triton.cdiv(N, rows_per_program)
    d_mu = torch.empty((chunks, K, D), device=z.device, dtype=torch.float32)
    d_lv = torch.empty_like(d_mu)
    _gmm_logprob_bwd_params_kernel[(triton.cdiv(K, block_k), triton.cdiv(D, block_d), chunks)](
        a, a.stride(0),
        z, z.stride(0), z.stride(1),
        mu32, inv_var, mu32.stride(0), mu32.stride(1),
        d_mu, d_lv,
        N, K, D, rows_per_program,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return (d_z, a.sum(0).to(log_pi.dtype), d_mu.sum(0).to(mu.dtype), d_lv.sum(0).to(logvar.dtype))
