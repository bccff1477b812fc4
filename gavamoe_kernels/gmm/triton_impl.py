"""The triton backend of the Gaussian-mixture op: the forward and backward kernels of kernels.py."""

from __future__ import annotations

from .interface import GmmBackend
from .kernels import log_prob_bwd, log_prob_fwd

BACKEND = GmmBackend("triton", log_prob_fwd, log_prob_bwd)
