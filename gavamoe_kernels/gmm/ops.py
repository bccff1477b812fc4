"""Public Gaussian-mixture functions: input checks, backend choice, custom ops and autograd."""

from __future__ import annotations

import importlib

import torch

from .._backend import resolve_backend
from .._checks import check_dim, check_same_device, check_tensor
from .interface import GmmBackend


def _impl(backend: str) -> GmmBackend:
    """A backend's record; loaded on first use (TRITON_INTERPRET is read when the kernels load)."""
    return importlib.import_module(f"gavamoe_kernels.gmm.{backend}_impl").BACKEND


@torch.library.custom_op("gavamoe_kernels::gmm_logprob_fwd", mutates_args=())
def _gmm_fwd(z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).log_prob_fwd(z, log_pi, mu, logvar)


@_gmm_fwd.register_fake
def _(z, log_pi, mu, logvar, backend):
    return z.new_empty((z.shape[0], mu.shape[0]), dtype=torch.float32), z.new_empty((z.shape[0],),
                                                                                    dtype=torch.float32)


@torch.library.custom_op("gavamoe_kernels::gmm_logprob_bwd", mutates_args=())
def _gmm_bwd(g: torch.Tensor, row_term: torch.Tensor, z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor,
             logvar: torch.Tensor, log_gamma: torch.Tensor, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).log_prob_bwd(g, row_term, z, log_pi, mu, logvar, log_gamma)


@_gmm_bwd.register_fake
def _(g, row_term, z, log_pi, mu, logvar, log_gamma, backend):
    return z.new_empty(z.shape), log_pi.new_empty(log_pi.shape), mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _setup(ctx, inputs, output):
    z, log_pi, mu, logvar, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(z, log_pi, mu, logvar, output[0])


def _backward(ctx, g, g_norm):
    """log_gamma = log_p - lse and log_norm = lse = logsumexp(log_p), so the gradient reaching
    log p is a = g - gamma * (sum_c g - g_norm); the per-row term is computed here, once, and
    each backend forms a inside its kernels."""
    z, log_pi, mu, logvar, log_gamma = ctx.saved_tensors
    g = torch.zeros_like(log_gamma) if g is None else g.float().contiguous()
    row_term = g.sum(-1)
    if g_norm is not None:
        row_term = row_term - g_norm.float()
    d_z, d_log_pi, d_mu, d_logvar = _gmm_bwd(g, row_term.contiguous(), z, log_pi, mu, logvar, log_gamma,
                                             ctx.backend)
    return d_z, d_log_pi, d_mu, d_logvar, None


torch.library.register_autograd("gavamoe_kernels::gmm_logprob_fwd", _backward, setup_context=_setup)


def _check_gmm_inputs(z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> None:
    check_tensor("z", z, "(N, D)", 2)
    check_tensor("log_pi", log_pi, "(K,)", 1)
    check_tensor("mu", mu, "(K, D)", 2)
    check_tensor("logvar", logvar, "(K, D)", 2)
    D = z.shape[1]
    K = log_pi.shape[0]
    if K == 0 or D == 0:
        raise ValueError(f"need at least one component and one dimension, got K={K}, D={D}")
    check_dim("mu", mu, 0, K, "(K, D) with K = log_pi.shape[0]")
    check_dim("mu", mu, 1, D, "(K, D) with D = z.shape[1]")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have shape (K, D) = {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    check_same_device("z", z, log_pi=log_pi, mu=mu, logvar=logvar)


def gmm_log_prob(z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_gamma (N, K) fp32, log_norm (N,) fp32), log_norm[n] = logsumexp_c log p_c(z[n])
    (the mixture log-density when log_pi is normalised). Differentiable in both outputs."""
    _check_gmm_inputs(z, log_pi, mu, logvar)
    return _gmm_fwd(z, log_pi, mu, logvar, resolve_backend(z.device, backend, z.dtype))


def gmm_log_responsibilities(z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                             backend: str | None = None) -> torch.Tensor:
    """Log-responsibilities of a diagonal Gaussian mixture, computed in fp32.

    Args:
        z: (N, D) fp32/bf16/fp16 points.
        log_pi: (K,) log mixture weights (need not be normalised).
        mu: (K, D) component means.
        logvar: (K, D) component log-variances.
        backend: "torch", "triton", "cuda" or "auto"; default from ``use_backend`` / GAVAMOE_BACKEND.

    Returns:
        (N, K) fp32: log_softmax over c of
        log_pi[c] - 0.5 * sum_d (log 2pi + logvar[c,d] + (z[d] - mu[c,d])^2 * exp(-logvar[c,d])).
        Differentiable with respect to z, log_pi, mu and logvar; gradients in each input's dtype.
    """
    return gmm_log_prob(z, log_pi, mu, logvar, backend)[0]


def gmm_responsibilities(z: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                         backend: str | None = None) -> torch.Tensor:
    """exp of :func:`gmm_log_responsibilities`: (N, K) fp32, rows sum to 1."""
    return torch.exp(gmm_log_responsibilities(z, log_pi, mu, logvar, backend))
