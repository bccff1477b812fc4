"""What a backend of the MoE ops supplies: four functions behind the custom ops of ops.py.

Shared layout (torch_impl.py describes it): token-slots s = t * k + j sorted stably by expert,
    sorted_slots [n], slot_pos [n], counts [E]   int32, n = T * k
    pre_act      [n, 2I]  the [gate | up] pre-activations in sorted order, kept for backward
One order everywhere: (topk_weights, topk_ids, logits), and their gradients (d_weights, d_logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MoEBackend:
    """route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize)
        -> (topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32)
    route_bwd(d_weights, d_logits, hidden, gate_weight, cluster_ids, topk_weights, topk_ids, logits, normalize)
        -> (d_hidden [T,H], d_gate_weight [C,E,H])
    experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward)
        -> (y [T,H], pre_act [n,2I] or [0,2I], sorted_slots, slot_pos, counts)
    experts_bwd(d_y, hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts)
        -> (d_hidden [T,H], d_topk_weights [T,k], d_w_gate_up [E,2I,H], d_w_down [E,H,I])
    Every output is contiguous, in its input's dtype (the routing outputs as listed).
    ``max_experts`` / ``max_top_k``: the largest E and k the backend runs (None: no limit)."""

    name: str
    route_fwd: Callable
    route_bwd: Callable
    experts_fwd: Callable
    experts_bwd: Callable
    max_experts: int | None = None
    max_top_k: int | None = None

    def unsupported(self, num_experts: int, top_k: int) -> str | None:
        """Why this backend cannot run E experts with top-k, or None."""
        if self.max_experts is not None and num_experts > self.max_experts:
            return f"the {self.name} backend runs at most {self.max_experts} experts, got E={num_experts}"
        if self.max_top_k is not None and top_k > self.max_top_k:
            return f"the {self.name} backend runs top_k up to {self.max_top_k}, got top_k={top_k}"
        return None
