"""The cuda backend of the MoE ops: the csrc/ router and routing metadata, Triton for the rest.

The CUDA extension holds the forward router (one warp per token, E <= 256, k <= 8) and the
stable counting sort of the token-slots by expert that the grouped GEMMs consume; both run on
the current stream with no host sync. The router backward and the expert grouped GEMMs
(forward and backward) are the Triton kernels of routing.py and grouped_gemm.py, fed the CUDA
metadata; it is the same layout the torch and Triton backends save for backward. Shapes past
the CUDA kernels' limits (E > 256 or k > 8) run the Triton kernels instead.
"""

from __future__ import annotations

from .._extension import extension
from . import grouped_gemm, routing


def _cuda_router_fits(num_experts: int, top_k: int = 1) -> bool:
    ext = extension()
    return num_experts <= ext.MAX_EXPERTS and top_k <= ext.MAX_TOP_K


def route_fwd(hidden, gate_weight, cluster_ids, top_k: int, normalize: bool):
    """(logits [T,E] fp32, topk_weights [T,k] fp32, topk_ids [T,k] int64)."""
    if not _cuda_router_fits(gate_weight.shape[1], top_k):
        return routing.route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize)
    return tuple(extension().route(hidden, gate_weight, cluster_ids, top_k, normalize))


route_bwd = routing.route_bwd


def routing_metadata(topk_ids, num_experts: int):
    """(sorted_slots [n], slot_pos [n], counts [E]) int32, equal to the torch backend's stable sort."""
    if not _cuda_router_fits(num_experts):
        return routing.routing_metadata(topk_ids, num_experts)
    return tuple(extension().routing_metadata(topk_ids, num_experts))


def experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward: bool):
    """Triton grouped GEMMs on the CUDA routing metadata; same contract as torch_impl."""
    return grouped_gemm.experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward,
                                    metadata=routing_metadata)


experts_bwd = grouped_gemm.experts_bwd
