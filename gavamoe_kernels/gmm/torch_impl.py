"""The torch backend for the Gaussian-mixture responsibilities.

The Mahalanobis term is expanded into matmuls,
    sum_d (z - mu)^2 / var = z^2 . (1/var) - 2 z . (mu/var) + mu^2 . (1/var),
computed in float64 about the mean of the component means, one block of rows at a time to
bound the float64 copies: no (N, K, D) tensor. Where the expansion cannot hold its digits (its
terms exceed the result by more than float64 can carry: a tiny variance, z near 1e20), those
rows are computed again in the direct form (z - mu)^2 / var, in float64.
"""

from __future__ import annotations

import math

import torch

from .interface import GmmBackend

LOG_2PI = math.log(2 * math.pi)
ROWS_PER_CHUNK = 1 << 16
DIRECT_ELEMENTS = 1 << 22  # float64 elements of one (rows, K, D) block of the direct form
EXPANSION_TOLERANCE = 1e-9  # nats: largest rounding error of log p accepted from the expansion


def _chunks(n: int, size: int = ROWS_PER_CHUNK):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _prepared(z, log_pi, mu, logvar):
    """float64 centre, centred means, inverse variances and per-component constants."""
    # centred on the component means, not on the data: a NaN row must not reach other rows
    centre = mu.double().mean(0)
    mu_c = mu.double() - centre  # [K, D]
    inv_var = torch.exp(-logvar.double())  # [K, D]
    const = log_pi.double() - 0.5 * (z.shape[1] * LOG_2PI + logvar.double().sum(-1))  # [K]
    return centre, mu_c, inv_var, const


def _direct_blocks(n: int, mu_c: torch.Tensor):
    """Row blocks of the direct form that bound its (rows, K, D) float64 copy to DIRECT_ELEMENTS."""
    return _chunks(n, max(1, DIRECT_ELEMENTS // mu_c.numel()))


def _direct_mahalanobis(zc, mu_c, inv_var):
    """sum_d (zc - mu_c)^2 inv_var, float64 [rows, K], in blocks that bound the (rows, K, D) copy."""
    if zc.shape[0] == 0:
        return zc.new_empty((0, mu_c.shape[0]))
    return torch.cat([((zc[rows, None, :] - mu_c[None]).square() * inv_var[None]).sum(-1)
                      for rows in _direct_blocks(zc.shape[0], mu_c)])


def _loose(square, mu_term):
    """Rows [n] where the expansion cannot hold EXPANSION_TOLERANCE, from square = zc^2 . inv_var
    [n, K]. The expansion's rounding is about eps times the size of its terms, square + |cross| +
    mu_term, and |cross| <= square + mu_term (Cauchy-Schwarz): a bound from each row's largest term."""
    return 8 * torch.finfo(torch.float64).eps * (square.amax(-1) + mu_term.max()) > EXPANSION_TOLERANCE


def _expanded(zc, mu_c, inv_var, mu_term):
    """(maha [n, K] by the expansion, loose [n]: see _loose)."""
    square = zc.square() @ inv_var.T  # [n, K]
    return square - 2 * zc @ (mu_c * inv_var).T + mu_term, _loose(square, mu_term)


def log_prob_fwd(z, log_pi, mu, logvar):
    """(log_gamma [N, K] fp32, log_norm [N] fp32) with log_norm = logsumexp_c log p_c(z)."""
    N, K = z.shape[0], mu.shape[0]
    centre, mu_c, inv_var, const = _prepared(z, log_pi, mu, logvar)
    mu_term = (mu_c.square() * inv_var).sum(-1)  # [K]
    log_gamma = torch.empty((N, K), device=z.device, dtype=torch.float32)
    log_norm = torch.empty((N,), device=z.device, dtype=torch.float32)
    for rows in _chunks(N):
        zc = z[rows].double() - centre
        maha, loose = _expanded(zc, mu_c, inv_var, mu_term)
        if loose.any():
            maha[loose] = _direct_mahalanobis(zc[loose], mu_c, inv_var)
        log_p = const - 0.5 * maha
        lse = torch.logsumexp(log_p, dim=-1)
        log_gamma[rows] = log_p - lse[:, None]
        log_norm[rows] = lse
    return log_gamma, log_norm


def log_prob_bwd(g, row_term, z, log_pi, mu, logvar, log_gamma):
    """(d z, d log_pi, d mu, d logvar) in the inputs' dtypes. With a = g - gamma * row_term the
    gradient reaching log p, and diff = z - mu:  dz = -sum_c a diff / var,  dmu = sum_n a diff / var,
    dlogvar = -0.5 sum_n a (1 - diff^2 / var),  dlog_pi = sum_n a.
    Moments M1 = sum_n a diff, M2 = sum_n a diff^2 by the expansion, or directly for loose rows."""
    centre, mu_c, inv_var, _ = _prepared(z, log_pi, mu, logvar)
    mu_term = (mu_c.square() * inv_var).sum(-1)
    d_z = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    s = torch.zeros(mu.shape[0], device=z.device, dtype=torch.float64)  # sum_n a
    m1 = torch.zeros_like(mu_c)
    m2 = torch.zeros_like(mu_c)
    for rows in _chunks(z.shape[0]):
        a = g[rows].double() - torch.exp(log_gamma[rows].double()) * row_term[rows].double()[:, None]  # [n, K]
        zc = z[rows].double() - centre
        loose = _loose(zc.square() @ inv_var.T, mu_term)
        at, zt = a[~loose], zc[~loose]
        d_z[rows][~loose] = (-(zt * (at @ inv_var) - at @ (mu_c * inv_var))).to(z.dtype)
        st, az = at.sum(0), at.T @ zt
        s += st
        m1 += az - st[:, None] * mu_c
        m2 += at.T @ zt.square() - 2 * mu_c * az + st[:, None] * mu_c.square()
        if loose.any():
            a_loose, z_loose = a[loose], zc[loose]
            d_z_loose = torch.empty_like(z_loose)
            for part in _direct_blocks(z_loose.shape[0], mu_c):
                al, diff = a_loose[part], z_loose[part][:, None, :] - mu_c[None]  # [nl, K], [nl, K, D]
                d_z_loose[part] = -(al[:, :, None] * diff * inv_var).sum(1)
                s += al.sum(0)
                m1 += (al[:, :, None] * diff).sum(0)
                m2 += (al[:, :, None] * diff.square()).sum(0)
            d_z[rows][loose] = d_z_loose.to(z.dtype)
    d_mu = inv_var * m1
    d_logvar = -0.5 * (s[:, None] - inv_var * m2)
    return d_z, s.to(log_pi.dtype), d_mu.to(mu.dtype), d_logvar.to(logvar.dtype)


BACKEND = GmmBackend("torch", log_prob_fwd, log_prob_bwd)
