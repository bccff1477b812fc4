"""The cuda backend of the MoE ops: the csrc/ router and routing metadata, Triton for the rest.

The CUDA extension holds the forward router (one warp per token, E <= 256, k <= 8) and the
stable counting sort of the token-slots by expert that the grouped GEMMs consume; both run on
the current stream with no host sync. The router backward and the expert grouped GEMMs
(forward and backward) are the Triton kernels of routing.py and grouped_gemm.py, fed the CUDA
metadata. Larger E or k are refused (``MoEBackend.unsupported``): ops.py raises for an explicit
request and picks triton when the choice is automatic.
"""

from __future__ import annotations

import functools

from .._extension import extension
from . import grouped_gemm, routing
from .interface import MoEBackend


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32)."""
    return tuple(extension().route(hidden, gate_weight, cluster_ids, top_k, normalize))


def routing_metadata(topk_ids, num_experts: int):
    """(sorted_slots [n], slot_pos [n], counts [E]) int32, equal to the torch backend's stable sort."""
    return tuple(extension().routing_metadata(topk_ids, num_experts))


BACKEND = MoEBackend(
    "cuda", route_fwd, routing.route_bwd,
    functools.partial(grouped_gemm.experts_fwd, metadata=routing_metadata), grouped_gemm.experts_bwd,
    max_experts=extension().MAX_EXPERTS, max_top_k=extension().MAX_TOP_K,
)
