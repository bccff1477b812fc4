"""Public MoE functions: input checks, backend choice, and the custom ops with their autograd.

Every backend sits behind the same four ``torch.library`` ops in the ``gavamoe_kernels``
namespace (route forward/backward, experts forward/backward). The ops carry fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them, and autograd
formulas that call the backward ops of the same backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .._backend import resolve_backend
from .._checks import (
    INDEX_DTYPES,
    check_dim,
    check_index_range,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
)


def _impl(backend: str):
    """(route module, experts module) of a backend; Triton modules load on first use, so that
    TRITON_INTERPRET set by the caller before the first call is honoured."""
    if backend == "torch":
        mod = importlib.import_module("gavamoe_kernels.moe.torch_impl")
        return mod, mod
    if backend == "triton":
        return (importlib.import_module("gavamoe_kernels.moe.routing"),
                importlib.import_module("gavamoe_kernels.moe.grouped_gemm"))
    if backend == "cuda":
        mod = importlib.import_module("gavamoe_kernels.moe.cuda_impl")
        return mod, mod
    raise ValueError(f"unknown backend {backend!r}")


@dataclass
class Routing:
    """Output of :func:`route`. topk_weights [T,k] fp32, topk_ids [T,k] int64, logits [T,E] fp32."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    logits: torch.Tensor


# ---- route ----------------------------------------------------------------------------------

@torch.library.custom_op("gavamoe_kernels::route_fwd", mutates_args=())
def _route_fwd(
    hidden: torch.Tensor, gate_weight: torch.Tensor, cluster_ids: torch.Tensor,
    top_k: int, normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend)[0].route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize)


@_route_fwd.register_fake
def _(hidden, gate_weight, cluster_ids, top_k, normalize, backend):
    T, E = hidden.shape[0], gate_weight.shape[1]
    return (hidden.new_empty((T, E), dtype=torch.float32), hidden.new_empty((T, top_k), dtype=torch.float32),
            hidden.new_empty((T, top_k), dtype=torch.int64))


@torch.library.custom_op("gavamoe_kernels::route_bwd", mutates_args=())
def _route_bwd(
    d_logits: torch.Tensor, d_weights: torch.Tensor, hidden: torch.Tensor, gate_weight: torch.Tensor,
    cluster_ids: torch.Tensor, logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend)[0].route_bwd(
        d_logits, d_weights, hidden, gate_weight, cluster_ids, logits, topk_weights, topk_ids, normalize
    )


@_route_bwd.register_fake
def _(d_logits, d_weights, hidden, gate_weight, *rest):
    return torch.empty_like(hidden), torch.empty_like(gate_weight)


def _route_setup(ctx, inputs, output):
    hidden, gate_weight, cluster_ids, _, normalize, backend = inputs
    logits, weights, ids = output
    ctx.save_for_backward(hidden, gate_weight, cluster_ids, logits, weights, ids)
    ctx.normalize, ctx.backend = normalize, backend


def _route_backward(ctx, d_logits, d_weights, _d_ids):
    hidden, gate_weight, cluster_ids, logits, weights, ids = ctx.saved_tensors
    d_logits = torch.zeros_like(logits) if d_logits is None else d_logits
    d_weights = torch.zeros_like(weights) if d_weights is None else d_weights
    d_hidden, d_gate = _route_bwd(
        d_logits, d_weights, hidden, gate_weight, cluster_ids, logits, weights, ids, ctx.normalize, ctx.backend
    )
    return d_hidden, d_gate, None, None, None, None


torch.library.register_autograd("gavamoe_kernels::route_fwd", _route_backward, setup_context=_route_setup)


# ---- experts --------------------------------------------------------------------------------

@torch.library.custom_op("gavamoe_kernels::experts_fwd", mutates_args=())
def _experts_fwd(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, save_for_backward: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend)[1].experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward)


@_experts_fwd.register_fake
def _(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward, backend):
    n = hidden.shape[0] * topk_ids.shape[1]
    E, two_i = w_gate_up.shape[:2]
    index = dict(dtype=torch.int32)
    return (torch.empty_like(hidden), hidden.new_empty((n if save_for_backward else 0, two_i)),
            hidden.new_empty((n,), **index), hidden.new_empty((n,), **index), hidden.new_empty((E,), **index))


@torch.library.custom_op("gavamoe_kernels::experts_bwd", mutates_args=())
def _experts_bwd(
    d_y: torch.Tensor, hidden: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, h: torch.Tensor, sorted_slots: torch.Tensor, slot_pos: torch.Tensor,
    counts: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend)[1].experts_bwd(
        d_y, hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts
    )


@_experts_bwd.register_fake
def _(d_y, hidden, topk_weights, w_gate_up, w_down, *rest):
    return (torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(w_gate_up),
            torch.empty_like(w_down))


def _experts_setup(ctx, inputs, output):
    hidden, topk_weights, _, w_gate_up, w_down, save_for_backward, backend = inputs
    _, h, sorted_slots, slot_pos, counts = output
    ctx.saved = save_for_backward
    ctx.backend = backend
    ctx.save_for_backward(hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts)


def _experts_backward(ctx, d_y, *_unused):
    if not ctx.saved:
        raise RuntimeError("moe_experts ran without saving for backward (grad mode was off at forward)")
    hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts = ctx.saved_tensors
    d_hidden, d_weights, d_w_gate_up, d_w_down = _experts_bwd(
        d_y.contiguous(), hidden, topk_weights, w_gate_up, w_down, h, sorted_slots, slot_pos, counts, ctx.backend
    )
    return d_hidden, d_weights, None, d_w_gate_up, d_w_down, None, None


torch.library.register_autograd("gavamoe_kernels::experts_fwd", _experts_backward, setup_context=_experts_setup)


# ---- public functions -----------------------------------------------------------------------

def _check_route_inputs(hidden, gate_weight, cluster_ids, top_k) -> None:
    check_tensor("hidden", hidden, "(T, H)", 2)
    check_tensor("gate_weight", gate_weight, "(C, E, H)", 3)
    T, H = hidden.shape
    C, E, _ = gate_weight.shape
    check_dim("gate_weight", gate_weight, 2, H, "(C, E, H) with H = hidden.shape[1]")
    check_tensor("cluster_ids", cluster_ids, "(T,)", 1, INDEX_DTYPES)
    check_dim("cluster_ids", cluster_ids, 0, T, "(T,) with T = hidden.shape[0]")
    check_same_device("hidden", hidden, gate_weight=gate_weight, cluster_ids=cluster_ids)
    check_same_dtype("hidden", hidden, gate_weight=gate_weight)
    if C == 0 or E == 0:
        raise ValueError(f"gate_weight must have shape (C, E, H) with C, E >= 1, got {tuple(gate_weight.shape)}")
    check_positive_int("top_k", top_k)
    if top_k > E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    check_index_range("cluster_ids", cluster_ids, C)


def _check_experts_inputs(hidden, topk_weights, topk_ids, w_gate_up, w_down) -> None:
    check_tensor("hidden", hidden, "(T, H)", 2)
    T, H = hidden.shape
    check_tensor("w_gate_up", w_gate_up, "(E, 2I, H)", 3)
    E, two_i, _ = w_gate_up.shape
    if two_i % 2 or two_i == 0 or E == 0:
        raise ValueError(f"w_gate_up must have shape (E, 2I, H) with E >= 1, I >= 1; got {tuple(w_gate_up.shape)}")
    check_dim("w_gate_up", w_gate_up, 2, H, "(E, 2I, H) with H = hidden.shape[1]")
    check_tensor("w_down", w_down, "(E, H, I)", 3)
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must have shape (E, H, I) = {(E, H, two_i // 2)}, got {tuple(w_down.shape)}")
    check_tensor("topk_ids", topk_ids, "(T, k)", 2, INDEX_DTYPES)
    check_dim("topk_ids", topk_ids, 0, T, "(T, k) with T = hidden.shape[0]")
    k = topk_ids.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_ids must have shape (T, k) with k in [1, E={E}], got k = {k}")
    check_tensor("topk_weights", topk_weights, "(T, k)", 2)
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have shape (T, k) = {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    check_same_device("hidden", hidden, topk_weights=topk_weights, topk_ids=topk_ids, w_gate_up=w_gate_up,
                      w_down=w_down)
    check_same_dtype("hidden", hidden, w_gate_up=w_gate_up, w_down=w_down)
    if T * k >= 2**31:
        raise ValueError(f"T * k = {T * k} token-slots exceeds the int32 slot index; split the batch")
    check_index_range("topk_ids", topk_ids, E)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def route(hidden, gate_weight, cluster_ids, top_k: int = 2, normalize: bool = True,
          backend: str | None = None) -> Routing:
    """Cluster-gated top-k routing.

    Args:
        hidden: (T, H) fp32/bf16/fp16 token states.
        gate_weight: (C, E, H), same dtype: one router matrix per cluster.
        cluster_ids: (T,) int32/int64 in [0, C): the cluster whose gate routes each token.
        top_k: experts per token, in [1, E].
        normalize: rescale the k selected probabilities to sum to 1.
        backend: "torch", "triton", "cuda" or "auto"; default from ``use_backend`` / GAVAMOE_BACKEND.

    Returns:
        Routing(topk_weights (T, k) fp32, topk_ids (T, k) int64, logits (T, E) fp32), where
        logits[t] = gate_weight[cluster_ids[t]] @ hidden[t]; ties go to the lower expert id.
        Differentiable with respect to hidden and gate_weight (through weights and logits).
    """
    _check_route_inputs(hidden, gate_weight, cluster_ids, top_k)
    name = resolve_backend(hidden.device, backend)
    logits, weights, ids = _route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize, name)
    return Routing(weights, ids, logits)


def moe_experts(hidden, topk_weights, topk_ids, w_gate_up, w_down, backend: str | None = None) -> torch.Tensor:
    """Weighted sum of SwiGLU experts (Hugging Face v5 weight layout).

    Args:
        hidden: (T, H) fp32/bf16/fp16.
        topk_weights: (T, k) float (fp32 recommended); used as given, no renormalisation.
        topk_ids: (T, k) int32/int64 in [0, E); any k from 1 to E.
        w_gate_up: (E, 2I, H), hidden's dtype; rows [0, I) gate projection, [I, 2I) up projection.
        w_down: (E, H, I), hidden's dtype.
        backend: as in :func:`route`.

    Returns:
        y (T, H) in hidden's dtype:
        y[t] = sum_j topk_weights[t,j] * (silu(g) * u) @ w_down[e].T, g,u = split(hidden[t] @ w_gate_up[e].T),
        e = topk_ids[t,j]. Differentiable with respect to hidden, topk_weights, w_gate_up, w_down.
    """
    _check_experts_inputs(hidden, topk_weights, topk_ids, w_gate_up, w_down)
    name = resolve_backend(hidden.device, backend)
    save = _needs_grad(hidden, topk_weights, w_gate_up, w_down)
    return _experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save, name)[0]


def cluster_gated_moe(hidden, cluster_ids, gate_weight, w_gate_up, w_down, top_k: int = 2,
                      normalize: bool = True, backend: str | None = None) -> torch.Tensor:
    """route() then moe_experts(): the whole MoE layer on (T, H) tokens; see both for shapes."""
    r = route(hidden, gate_weight, cluster_ids, top_k, normalize, backend)
    return moe_experts(hidden, r.topk_weights, r.topk_ids, w_gate_up, w_down, backend)
