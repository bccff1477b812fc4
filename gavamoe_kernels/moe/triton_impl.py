"""The triton backend of the MoE ops: the router of routing.py, the routing metadata of
metadata.py and the grouped GEMMs of grouped_gemm.py (same contract as torch_impl.py)."""

from __future__ import annotations

from . import grouped_gemm, routing
from .interface import MoEBackend

BACKEND = MoEBackend("triton", routing.route_fwd, routing.route_bwd, grouped_gemm.experts_fwd,
                     grouped_gemm.experts_bwd)
