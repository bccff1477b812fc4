"""Shapes and inputs of the MoE tests, shared by the grids of every backend."""

from __future__ import annotations

import torch

from gavamoe_kernels.moe import reference as ref
from tests.helpers import DEVICE

# experts: (T, H, I, E, k, routing): T around the decode limit (64), prime E, k = 1 and k = E,
# every token to one expert, H and I not powers of two
EXPERT_SHAPES = [
    (0, 32, 16, 4, 2, "random"),
    (1, 48, 40, 7, 2, "random"),
    (7, 40, 24, 5, 5, "random"),
    (64, 24, 20, 3, 1, "random"),
    (129, 72, 40, 13, 2, "random"),
    (70, 36, 28, 6, 2, "one_expert"),
]
EXPERT_IDS = [f"T{t}-H{h}-I{i}-E{e}-k{k}-{r}" for t, h, i, e, k, r in EXPERT_SHAPES]

# router: (T, H, E, C, k): empty, single token, k = E, prime E with H not a power of two, k = 1
ROUTE_SHAPES = [(0, 32, 5, 2, 2), (1, 48, 7, 3, 1), (7, 40, 5, 1, 5), (129, 72, 13, 4, 2), (33, 20, 3, 2, 3)]
ROUTE_IDS = [f"T{t}-H{h}-E{e}-C{c}-k{k}" for t, h, e, c, k in ROUTE_SHAPES]


def expert_inputs(T, H, I, E, k, routing, dtype, seed=0):
    """hidden [T,H], topk_weights [T,k] fp32, topk_ids [T,k], w_gate_up [E,2I,H], w_down [E,H,I]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    weights = torch.rand(T, k, generator=g) + 0.1
    if routing == "one_expert":
        ids = torch.full((T, k), E - 1)
        ids[:, 1:] = torch.arange(k - 1).expand(T, -1) if k > 1 else ids[:, 1:]
    else:
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    to = lambda t: t.to(DEVICE, dtype)
    return to(hidden), weights.to(DEVICE), ids.to(DEVICE), to(w_gate_up), to(w_down)


def route_inputs(T, H, E, C, dtype, seed=0, id_dtype=torch.int64):
    """hidden [T,H], gate_weight [C,E,H] (logits of order 3, so top-k is clear), cluster_ids [T]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    gate = torch.randn(C, E, H, generator=g) / H**0.5 * 3
    cluster_ids = torch.randint(0, C, (T,), generator=g).to(id_dtype)
    return hidden.to(DEVICE, dtype), gate.to(DEVICE, dtype), cluster_ids.to(DEVICE)


def reference_probs(hidden, gate, cluster_ids):
    """softmax of the float64 reference logits, on the CPU."""
    return torch.softmax(ref.route_logits(hidden.double().cpu(), gate.double().cpu(), cluster_ids.cpu()), -1)
