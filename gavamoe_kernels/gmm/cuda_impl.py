"""The cuda backend of the Gaussian-mixture op: the csrc/ forward kernel, the Triton backward.

The forward is the register-tiled CUDA kernel of csrc/gmm.cu on the parameters prepared in fp32
exactly as the Triton kernels read them. The backward stays on Triton until a GPU measurement
shows a CUDA one that beats it (benchmarks/NOTES.md).
"""

from __future__ import annotations

from .._extension import extension
from .interface import GmmBackend
from .kernels import log_prob_bwd, prepared_params


def log_prob_fwd(z, log_pi, mu, logvar):
    """(log_gamma [N, K] fp32, log_norm [N] fp32)."""
    mu32, inv_var, const = prepared_params(log_pi, mu, logvar, z.shape[1])
    return tuple(extension().gmm_log_prob(z, mu32, inv_var, const))


BACKEND = GmmBackend("cuda", log_prob_fwd, log_prob_bwd)
