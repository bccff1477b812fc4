"""The torch backend for the Gaussian-mixture responsibilities.

Never builds the (N, K, D) differences: the Mahalanobis term is expanded into matmuls,
    sum_d (z - mu)^2 / var = z^2 . (1/var) - 2 z . (mu/var) + mu^2 . (1/var),
computed in float64 about the mean of the component means (so the three terms do not cancel
away the precision), one block of rows at a time to bound the float64 copies.
"""

from __future__ import annotations

import torch

from .reference import LOG_2PI

ROWS_PER_CHUNK = 1 << 16


def _chunks(n: int):
    for start in range(0, n, ROWS_PER_CHUNK):
        yield slice(start, min(n, start + ROWS_PER_CHUNK))


def _prepared(z, log_pi, mu, logvar):
    """float64 centre, centred means, inverse variances and per-component constants."""
    # centred on the component means, not on the data: a NaN row must not reach other rows
    centre = mu.double().mean(0)
    mu_c = mu.double() - centre  # [K, D]
    inv_var = torch.exp(-logvar.double())  # [K, D]
    const = log_pi.double() - 0.5 * (z.shape[1] * LOG_2PI + logvar.double().sum(-1))  # [K]
    return centre, mu_c, inv_var, const


def log_prob_fwd(z, log_pi, mu, logvar):
    """(log_gamma [N, K] fp32, log_norm [N] fp32) with log_norm = logsumexp_c log p_c(z)."""
    N, K = z.shape[0], mu.shape[0]
    centre, mu_c, inv_var, const = _prepared(z, log_pi, mu, logvar)
    mu_term = (mu_c.square() * inv_var).sum(-1)  # [K]
    log_gamma = torch.empty((N, K), device=z.device, dtype=torch.float32)
    log_norm = torch.empty((N,), device=z.device, dtype=torch.float32)
    for rows in _chunks(N):
        zc = z[rows].double() - centre
        log_p = const - 0.5 * (zc.square() @ inv_var.T - 2 * zc @ (mu_c * inv_var).T + mu_term)
        lse = torch.logsumexp(log_p, dim=-1)
        log_gamma[rows] = log_p - lse[:, None]
        log_norm[rows] = lse
    return log_gamma, log_norm


def log_prob_grad_input(g, g_norm, log_gamma) -> torch.Tensor:
    """a = d loss / d log p_c(z) [N, K] fp32 from the gradients of log_gamma and log_norm:
    log_gamma = log_p - lse, lse = logsumexp(log_p)  =>  a = g - gamma * (sum_c g - g_norm)."""
    gamma = torch.exp(log_gamma)
    return g.float() - gamma * (g.float().sum(-1, keepdim=True) - g_norm.float()[:, None])


def log_prob_bwd(g, g_norm, z, log_pi, mu, logvar, log_gamma):
    """(d z, d log_pi, d mu, d logvar) in the inputs' dtypes. With a = d loss / d log p and
    diff = z - mu:  dz = -sum_c a diff / var,  dmu = sum_n a diff / var,
    dlogvar = -0.5 sum_n a (1 - diff^2 / var),  dlog_pi = sum_n a."""
    centre, mu_c, inv_var, _ = _prepared(z, log_pi, mu, logvar)
    a_all = log_prob_grad_input(g, g_norm, log_gamma)
    d_z = torch.empty_like(z)
    s = torch.zeros(mu.shape[0], device=z.device, dtype=torch.float64)  # sum_n a
    a_z = torch.zeros_like(mu_c)  # sum_n a zc
    a_z2 = torch.zeros_like(mu_c)  # sum_n a zc^2
    for rows in _chunks(z.shape[0]):
        a = a_all[rows].double()
        zc = z[rows].double() - centre
        d_z[rows] = (-(zc * (a @ inv_var) - a @ (mu_c * inv_var))).to(z.dtype)
        s += a.sum(0)
        a_z += a.T @ zc
        a_z2 += a.T @ zc.square()
    d_mu = inv_var * (a_z - s[:, None] * mu_c)
    d_logvar = -0.5 * (s[:, None] - inv_var * (a_z2 - 2 * mu_c * a_z + s[:, None] * mu_c.square()))
    return d_z, s.to(log_pi.dtype), d_mu.to(mu.dtype), d_logvar.to(logvar.dtype)
