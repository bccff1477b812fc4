"""Shapes and inputs of the Gaussian-mixture tests, shared by the grids of every backend."""

from __future__ import annotations

import torch

from tests.helpers import DEVICE

# (N, D, K): empty, one row, K = 1, D not a power of two, K larger than one block of components,
# and past the stated limits D = 1024, K = 256
SHAPES = [(0, 8, 3), (1, 5, 1), (37, 129, 5), (200, 128, 16), (33, 20, 40), (9, 1030, 3), (6, 12, 257)]
SHAPE_IDS = [f"N{n}-D{d}-K{k}" for n, d, k in SHAPES]


def gmm_inputs(N, D, K, dtype=torch.float32, seed=0):
    """z [N, D] near its components, log_pi [K] (not normalised), mu [K, D], logvar [K, D]."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=g) * 0.7
    labels = torch.randint(0, K, (N,), generator=g)
    z = mu[labels] + torch.randn(N, D, generator=g)  # points near their components
    log_pi = torch.randn(K, generator=g)
    logvar = torch.randn(K, D, generator=g) * 0.3
    return z.to(DEVICE, dtype), log_pi.to(DEVICE), mu.to(DEVICE), logvar.to(DEVICE)
