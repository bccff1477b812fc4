"""Public MoE functions: input checks, backend choice, and the custom ops with their autograd.

Every backend sits behind the same four ``torch.library`` ops in the ``gavamoe_kernels``
namespace (route forward/backward, experts forward/backward). The ops carry fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them, and autograd
formulas that call the backward ops of the same backend.

User input is checked once, at the public function; what the library produced itself (the
router's top-k ids handed to the experts) is not checked again, and the backend is resolved
once per call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .._backend import resolve_backend
from .._checks import (
    INDEX_DTYPES,
    check_bool,
    check_dim,
    check_index_range,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .interface import MoEBackend


def _impl(backend: str) -> MoEBackend:
    """A backend's record; backend modules load on first use, so that TRITON_INTERPRET set by
    the caller before the first call is honoured."""
    return importlib.import_module(f"gavamoe_kernels.moe.{backend}_impl").BACKEND


def resolve_moe_backend(device: torch.device, dtype: torch.dtype, backend: str | None, num_experts: int,
                        top_k: int) -> str:
    """The backend that runs E experts with top-k on these tensors (see _backend.resolve_backend)."""
    return resolve_backend(device, backend, dtype, unsupported=lambda name: _impl(name).unsupported(num_experts, top_k))


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
    return _impl(backend).route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize)


@_route_fwd.register_fake
def _(hidden, gate_weight, cluster_ids, top_k, normalize, backend):
    T, E = hidden.shape[0], gate_weight.shape[1]
    return (hidden.new_empty((T, top_k), dtype=torch.float32), hidden.new_empty((T, top_k), dtype=torch.int64),
            hidden.new_empty((T, E), dtype=torch.float32))


@torch.library.custom_op("gavamoe_kernels::route_bwd", mutates_args=())
def _route_bwd(
    d_weights: torch.Tensor, d_logits: torch.Tensor, hidden: torch.Tensor, gate_weight: torch.Tensor,
    cluster_ids: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, logits: torch.Tensor,
    normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).route_bwd(
        d_weights, d_logits, hidden, gate_weight, cluster_ids, topk_weights, topk_ids, logits, normalize
    )


@_route_bwd.register_fake
def _(d_weights, d_logits, hidden, gate_weight, *rest):
    return hidden.new_empty(hidden.shape), gate_weight.new_empty(gate_weight.shape)


def _route_setup(ctx, inputs, output):
    hidden, gate_weight, cluster_ids, _, normalize, backend = inputs
    weights, ids, logits = output
    ctx.save_for_backward(hidden, gate_weight, cluster_ids, weights, ids, logits)
    ctx.normalize, ctx.backend = normalize, backend


def _route_backward(ctx, d_weights, _d_ids, d_logits):
    hidden, gate_weight, cluster_ids, weights, ids, logits = ctx.saved_tensors
    d_weights = torch.zeros_like(weights) if d_weights is None else d_weights
    d_logits = torch.zeros_like(logits) if d_logits is None else d_logits
    d_hidden, d_gate = _route_bwd(
        d_weights, d_logits, hidden, gate_weight, cluster_ids, weights, ids, logits, ctx.normalize, ctx.backend
    )
    return d_hidden, d_gate, None, None, None, None


torch.library.register_autograd("gavamoe_kernels::route_fwd", _route_backward, setup_context=_route_setup)


# ---- experts --------------------------------------------------------------------------------

@torch.library.custom_op("gavamoe_kernels::experts_fwd", mutates_args=())
def _experts_fwd(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, save_for_backward: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward)


@_experts_fwd.register_fake
def _(hidden, topk_weights, topk_ids, w_gate_up, w_down, save_for_backward, backend):
    n = hidden.shape[0] * topk_ids.shape[1]
    E, two_i = w_gate_up.shape[:2]
    index = dict(dtype=torch.int32)
    return (hidden.new_empty(hidden.shape), hidden.new_empty((n if save_for_backward else 0, two_i)),
            hidden.new_empty((n,), **index), hidden.new_empty((n,), **index), hidden.new_empty((E,), **index))


@torch.library.custom_op("gavamoe_kernels::experts_bwd", mutates_args=())
def _experts_bwd(
    d_y: torch.Tensor, hidden: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, pre_act: torch.Tensor, sorted_slots: torch.Tensor, slot_pos: torch.Tensor,
    counts: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).experts_bwd(
        d_y, hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts
    )


@_experts_bwd.register_fake
def _(d_y, hidden, topk_weights, w_gate_up, w_down, *rest):
    return (hidden.new_empty(hidden.shape), topk_weights.new_empty(topk_weights.shape),
            w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape))


def _experts_setup(ctx, inputs, output):
    hidden, topk_weights, _, w_gate_up, w_down, save_for_backward, backend = inputs
    _, pre_act, sorted_slots, slot_pos, counts = output
    ctx.saved = save_for_backward
    ctx.backend = backend
    ctx.save_for_backward(hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts)


def _experts_backward(ctx, d_y, *_unused):
    if not ctx.saved:
        raise RuntimeError("moe_experts ran without saving for backward (grad mode was off at forward)")
    hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts = ctx.saved_tensors
    d_hidden, d_weights, d_w_gate_up, d_w_down = _experts_bwd(
        d_y.contiguous(), hidden, topk_weights, w_gate_up, w_down, pre_act, sorted_slots, slot_pos, counts,
        ctx.backend,
    )
    return d_hidden, d_weights, None, d_w_gate_up, d_w_down, None, None


torch.library.register_autograd("gavamoe_kernels::experts_fwd", _experts_backward, setup_context=_experts_setup)


# ---- checks of user input -------------------------------------------------------------------

def _check_route_inputs(hidden: torch.Tensor, gate_weight: torch.Tensor, cluster_ids: torch.Tensor,
                        top_k: int, normalize: bool) -> None:
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
    check_bool("normalize", normalize)
    check_positive_int("top_k", top_k)
    if top_k > E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")


def _check_expert_weights(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
    check_tensor("hidden", hidden, "(T, H)", 2)
    H = hidden.shape[1]
    check_tensor("w_gate_up", w_gate_up, "(E, 2I, H)", 3)
    E, two_i, _ = w_gate_up.shape
    if two_i % 2 or two_i == 0 or E == 0:
        raise ValueError(f"w_gate_up must have shape (E, 2I, H) with E >= 1, I >= 1; got {tuple(w_gate_up.shape)}")
    check_dim("w_gate_up", w_gate_up, 2, H, "(E, 2I, H) with H = hidden.shape[1]")
    check_tensor("w_down", w_down, "(E, H, I)", 3)
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"w_down must have shape (E, H, I) = {(E, H, two_i // 2)}, got {tuple(w_down.shape)}")
    check_same_device("hidden", hidden, w_gate_up=w_gate_up, w_down=w_down)
    check_same_dtype("hidden", hidden, w_gate_up=w_gate_up, w_down=w_down)


def _check_slot_count(T: int, k: int) -> None:
    if T * k >= 2**31:
        raise ValueError(f"T * k = {T * k} token-slots exceeds the int32 slot index; split the batch")


def _check_experts_inputs(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
    _check_expert_weights(hidden, w_gate_up, w_down)
    T = hidden.shape[0]
    E = w_gate_up.shape[0]
    check_tensor("topk_ids", topk_ids, "(T, k)", 2, INDEX_DTYPES)
    check_dim("topk_ids", topk_ids, 0, T, "(T, k) with T = hidden.shape[0]")
    k = topk_ids.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_ids must have shape (T, k) with k in [1, E={E}], got k = {k}")
    check_tensor("topk_weights", topk_weights, "(T, k)", 2)
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have shape (T, k) = {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    check_same_device("hidden", hidden, topk_weights=topk_weights, topk_ids=topk_ids)
    _check_slot_count(T, k)
    check_index_range("topk_ids", topk_ids, E)


def check_moe_inputs(hidden: torch.Tensor, cluster_ids: torch.Tensor, gate_weight: torch.Tensor,
                     w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int, normalize: bool) -> None:
    """Everything of the whole layer's input but the range of the cluster ids, which the caller
    checks on the tensor the user gave (check_index_range remembers tensors that passed)."""
    _check_route_inputs(hidden, gate_weight, cluster_ids, top_k, normalize)
    _check_expert_weights(hidden, w_gate_up, w_down)
    if gate_weight.shape[1] != w_gate_up.shape[0]:
        raise ValueError(f"gate_weight has E={gate_weight.shape[1]} experts but w_gate_up has {w_gate_up.shape[0]}")
    _check_slot_count(hidden.shape[0], top_k)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---- the layer's path: inputs already checked, backend already resolved ---------------------

def moe_forward(hidden: torch.Tensor, cluster_ids: torch.Tensor, gate_weight: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, top_k: int, normalize: bool, backend: str) -> tuple[torch.Tensor, Routing]:
    """Route, then the experts, on checked inputs and a resolved backend: (y [T,H], Routing)."""
    weights, ids, logits = _route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize, backend)
    save = _needs_grad(hidden, gate_weight, w_gate_up, w_down)
    y = _experts_fwd(hidden, weights, ids, w_gate_up, w_down, save, backend)[0]
    return y, Routing(weights, ids, logits)


# ---- public functions -----------------------------------------------------------------------

def route(hidden: torch.Tensor, gate_weight: torch.Tensor, cluster_ids: torch.Tensor, top_k: int = 2,
          normalize: bool = True, backend: str | None = None) -> Routing:
    """Cluster-gated top-k routing.

    Args:
        hidden: (T, H) fp32/bf16/fp16 token states, any strides.
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
    _check_route_inputs(hidden, gate_weight, cluster_ids, top_k, normalize)
    check_index_range("cluster_ids", cluster_ids, gate_weight.shape[0])
    name = resolve_moe_backend(hidden.device, hidden.dtype, backend, gate_weight.shape[1], top_k)
    weights, ids, logits = _route_fwd(hidden, gate_weight, cluster_ids, top_k, normalize, name)
    return Routing(weights, ids, logits)


def moe_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Weighted sum of SwiGLU experts (Hugging Face v5 weight layout).

    Args:
        hidden: (T, H) fp32/bf16/fp16, any strides.
        topk_weights: (T, k) float (fp32 recommended); used as given, no renormalisation.
        topk_ids: (T, k) int32/int64 in [0, E); any k from 1 to E.
        w_gate_up: (E, 2I, H), hidden's dtype; rows [0, I) gate projection, [I, 2I) up projection.
        w_down: (E, H, I), hidden's dtype.
        backend: as in :func:`route`.

    Returns:
        y (T, H) contiguous, in hidden's dtype:
        y[t] = sum_j topk_weights[t,j] * (silu(g) * u) @ w_down[e].T, g,u = split(hidden[t] @ w_gate_up[e].T),
        e = topk_ids[t,j]. Differentiable with respect to hidden, topk_weights, w_gate_up, w_down.
    """
    _check_experts_inputs(hidden, topk_weights, topk_ids, w_gate_up, w_down)
    name = resolve_moe_backend(hidden.device, hidden.dtype, backend, w_gate_up.shape[0], topk_ids.shape[1])
    save = _needs_grad(hidden, topk_weights, w_gate_up, w_down)
    return _experts_fwd(hidden, topk_weights, topk_ids, w_gate_up, w_down, save, name)[0]


def cluster_gated_moe(hidden: torch.Tensor, cluster_ids: torch.Tensor, gate_weight: torch.Tensor,
                      w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int = 2, normalize: bool = True,
                      backend: str | None = None) -> torch.Tensor:
    """route() then moe_experts(): the whole MoE layer on (T, H) tokens; see both for shapes.
    Returns y (T, H) contiguous, in hidden's dtype."""
    check_moe_inputs(hidden, cluster_ids, gate_weight, w_gate_up, w_down, top_k, normalize)
    check_index_range("cluster_ids", cluster_ids, gate_weight.shape[0])
    name = resolve_moe_backend(hidden.device, hidden.dtype, backend, gate_weight.shape[1], top_k)
    return moe_forward(hidden, cluster_ids, gate_weight, w_gate_up, w_down, top_k, normalize, name)[0]
