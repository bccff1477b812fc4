"""What a backend of the Gaussian-mixture op supplies: two functions behind the custom ops of ops.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GmmBackend:
    """log_prob_fwd(z, log_pi, mu, logvar) -> (log_gamma [N, K] fp32, log_norm [N] fp32)
    log_prob_bwd(g, row_term, z, log_pi, mu, logvar, log_gamma) -> (d z, d log_pi, d mu, d logvar)
        g [N, K] fp32 = d loss / d log_gamma, row_term [N] fp32 = sum_c g - d loss / d log_norm,
        both contiguous; the gradient reaching log p is a = g - exp(log_gamma) * row_term.
    Outputs contiguous; gradients in their inputs' dtypes."""

    name: str
    log_prob_fwd: Callable
    log_prob_bwd: Callable
