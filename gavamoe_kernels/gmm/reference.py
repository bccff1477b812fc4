"""Gaussian-mixture responsibilities in plain PyTorch: the ground truth for every backend.

    log p_c(z)  = log_pi[c] - 0.5 * sum_d (log 2pi + logvar[c,d] + (z[d] - mu[c,d])^2 * exp(-logvar[c,d]))
    log_gamma   = log_softmax_c(log p_c(z))           (log_pi need not be normalised)

Readable rather than frugal: it builds the (N, K, D) differences. Tests run it in float64.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def component_log_prob(z, log_pi, mu, logvar) -> torch.Tensor:
    """log p_c(z[n]) for every row and component; [N, K]."""
    diff = z[:, None, :] - mu[None, :, :]  # [N, K, D]
    mahalanobis = (diff.square() * torch.exp(-logvar)[None]).sum(-1)
    return log_pi[None, :] - 0.5 * (z.shape[1] * LOG_2PI + logvar.sum(-1)[None, :] + mahalanobis)


def log_responsibilities(z, log_pi, mu, logvar) -> torch.Tensor:
    """log_gamma [N, K] = log_softmax over components of component_log_prob."""
    return torch.log_softmax(component_log_prob(z, log_pi, mu, logvar), dim=-1)


def naive_responsibilities(z, log_pi, mu, logvar) -> torch.Tensor:
    """What the VaDE reference implementations (and the GaVaMoE reference code) compute:
    exp(log pi + log N) per component, then normalise. In fp32 at D = 128 every term
    underflows to 0 and the result is 0/0 or uniform. Kept only to show the bug in tests."""
    p = torch.exp(component_log_prob(z, log_pi, mu, logvar))
    return p / p.sum(-1, keepdim=True)
