"""Diagonal Gaussian-mixture fit by EM on the device of the data (E-step on the fused kernel)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_tensor
from .ops import gmm_log_prob


@dataclass
class GmmParams:
    """A fitted diagonal Gaussian mixture: log_pi (K,), mu (K, D), logvar (K, D), all fp32;
    lower_bound is the mean log-likelihood per sample reached; n_iter the EM steps taken."""

    log_pi: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    lower_bound: float
    n_iter: int
    converged: bool


def _kmeans_pp(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn does it): at each step draw 2 + log k candidates
    with probability proportional to the squared distance to the nearest centre so far, and keep
    the one that lowers the total squared distance most. Plain k-means++ (one draw) too often
    puts two centres in one well-separated cluster, a local optimum EM does not leave."""
    n = z.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator).item())
    centres = [z[first]]
    nearest = (z - z[first]).square().sum(-1)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        if weights.sum() <= 0:  # fewer distinct points than components
            pick = int(torch.randint(n, (1,), generator=generator).item())
            candidate_nearest = nearest
        else:
            best_potential = math.inf
            for c in torch.multinomial(weights, trials, replacement=True, generator=generator).tolist():
                with_c = torch.minimum(nearest, (z - z[c]).square().sum(-1))
                potential = with_c.sum().item()
                if potential < best_potential:
                    best_potential, pick, candidate_nearest = potential, c, with_c
        centres.append(z[pick])
        nearest = torch.minimum(nearest, candidate_nearest)
    return torch.stack(centres)


def _kmeans(z: torch.Tensor, centres: torch.Tensor, iters: int) -> torch.Tensor:
    """Hard assignments after a few Lloyd steps from ``centres`` (scikit-learn also starts EM
    from k-means labels)."""
    for _ in range(iters):
        labels = torch.cdist(z, centres).argmin(-1)
        counts = torch.bincount(labels, minlength=centres.shape[0]).to(z.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, z)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return torch.cdist(z, centres).argmin(-1)


def _m_step(z: torch.Tensor, resp: torch.Tensor, reg_covar: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and variances from responsibilities (N, K); variance floored by reg_covar."""
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps  # [K]
    mu = (resp.T @ z) / nk[:, None]
    var = (resp.T @ z.square()) / nk[:, None] - mu.square() + reg_covar
    return torch.log(nk / z.shape[0]), mu, torch.log(var.clamp_min(reg_covar))


@torch.no_grad()
def fit_gmm(z: torch.Tensor, num_components: int, max_iter: int = 100, tol: float = 1e-3, seed: int = 0,
            reg_covar: float = 1e-6, backend: str | None = None) -> GmmParams:
    """Fit a diagonal Gaussian mixture to z (N, D) by EM on z's device.

    k-means++ seeding and a few Lloyd steps give the initial responsibilities; the E-step runs
    the fused responsibility kernel; the M-step is three reductions. Stops when the mean
    log-likelihood per sample changes by less than ``tol`` (scikit-learn's rule) or after
    ``max_iter`` steps. ``reg_covar`` is added to every variance, like scikit-learn's.
    The data are centred (and the means shifted back) so fp32 M-step sums keep their precision.
    """
    check_tensor("z", z, "(N, D)", 2)
    check_positive_int("num_components", num_components)
    check_positive_int("max_iter", max_iter)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    n = z.shape[0]
    if n < num_components:
        raise ValueError(f"z must have at least num_components={num_components} rows, got {n}")
    if not torch.isfinite(z).all():
        raise ValueError("z must be finite (no NaN or inf) to fit a mixture")
    for name, value in (("tol", tol), ("reg_covar", reg_covar)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if reg_covar == 0:
        flat = (z.float().var(0) == 0).nonzero().flatten().tolist()
        if flat:
            raise ValueError(f"z has zero variance in dimension(s) {flat[:10]}: with reg_covar=0 a component's "
                             f"variance there is 0 and its log-density infinite; pass reg_covar > 0")
    x = z.float()
    centre = x.mean(0)
    x = x - centre
    generator = torch.Generator().manual_seed(int(seed))
    labels = _kmeans(x, _kmeans_pp(x, num_components, generator), iters=10)
    resp = torch.nn.functional.one_hot(labels, num_components).to(x.dtype)
    log_pi, mu, logvar = _m_step(x, resp, reg_covar)
    lower_bound, converged, n_iter = -math.inf, False, 0
    for step in range(1, max_iter + 1):
        n_iter = step
        log_gamma, log_norm = gmm_log_prob(x, log_pi, mu, logvar, backend)
        previous, lower_bound = lower_bound, log_norm.mean().item()
        log_pi, mu, logvar = _m_step(x, torch.exp(log_gamma), reg_covar)
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    lower_bound = gmm_log_prob(x, log_pi, mu, logvar, backend)[1].mean().item()
    if not all(torch.isfinite(t).all() for t in (log_pi, mu, logvar)):
        raise ValueError(f"EM reached non-finite parameters (a component collapsed onto identical points, variance "
                         f"0); fit with reg_covar > 0 (got {reg_covar})")
    return GmmParams(log_pi, mu + centre, logvar, lower_bound, n_iter, converged)
