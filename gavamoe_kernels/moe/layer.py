"""ClusterGatedMoE: the drop-in nn.Module for a cluster-gated fine-grained SwiGLU MoE."""

from __future__ import annotations

import contextlib
import math
from typing import cast

import torch
from torch import nn

from .._checks import INDEX_DTYPES, check_bool, check_index_range, check_positive_int
from .ops import check_moe_inputs, moe_forward, resolve_moe_backend


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss  E * sum_e f_e * P_e  (1.0 when perfectly balanced).

    f_e: fraction of token-slots sent to expert e (not differentiable);
    P_e: mean over tokens of softmax(logits)[:, e], each token's probabilities coming from
    the gate of its own cluster.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    probs = torch.softmax(logits.float(), dim=-1)
    counts = torch.zeros(num_experts, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(0, topk_ids.reshape(-1).long(), torch.ones_like(topk_ids, dtype=torch.float32).reshape(-1))
    fraction = counts / topk_ids.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


class ClusterGatedMoE(nn.Module):
    """Mixture of ``num_experts`` SwiGLU experts routed by one gate per cluster.

    Parameters (transformers v5 expert layout):
        gate_weight (C, E, H): router of each cluster.
        w_gate_up (E, 2I, H): gate projection rows [0, I), up projection rows [I, 2I).
        w_down (E, H, I).

    ``forward(hidden_states, cluster_ids)``: hidden_states (..., H); cluster_ids either one id per
    sequence (shape (B,) for hidden_states (B, S, H)) or one per token (hidden_states.shape[:-1]).
    After a forward in training mode with gradients enabled, ``aux_loss`` holds the
    Switch/Mixtral load-balancing loss of that call (E * sum_e f_e P_e, 1.0 when balanced) for a
    training loop to add with its own coefficient; in eval mode or under ``torch.no_grad()``
    (generation) it is not computed and ``aux_loss`` is None.
    Parameters of another dtype than the input are cast to the input's dtype for the call; under
    ``torch.autocast`` the input and the parameters are cast to the autocast dtype, as nn.Linear's
    are (fp32 master weights with bf16 compute).
    The cluster ids are range-checked once per ids tensor (see GAVAMOE_ID_CHECK in the README).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, num_clusters: int,
                 top_k: int = 2, normalize: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.intermediate_size = check_positive_int("intermediate_size", intermediate_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.num_clusters = check_positive_int("num_clusters", num_clusters)
        self.top_k = check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.normalize = check_bool("normalize", normalize)
        self.backend = backend
        H, I, E, C = hidden_size, intermediate_size, num_experts, num_clusters
        self.gate_weight = nn.Parameter(torch.empty(C, E, H, device=device, dtype=dtype))
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * I, H, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, H, I, device=device, dtype=dtype))
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every matrix."""
        for weight, fan_in in ((self.gate_weight, self.hidden_size), (self.w_gate_up, self.hidden_size),
                               (self.w_down, self.intermediate_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, num_clusters={self.num_clusters}, top_k={self.top_k}, "
                f"normalize={self.normalize}")

    def token_cluster_ids(self, hidden_states: torch.Tensor, cluster_ids: torch.Tensor) -> torch.Tensor:
        """Flatten per-sequence or per-token cluster ids to one id per token (T,)."""
        lead = tuple(hidden_states.shape[:-1])
        if not isinstance(cluster_ids, torch.Tensor) or cluster_ids.dtype not in INDEX_DTYPES:
            raise ValueError(f"cluster_ids must be an int32/int64 tensor of shape {lead} (per token) "
                             f"or ({lead[0] if lead else 'B'},) (per sequence)")
        if tuple(cluster_ids.shape) == lead:
            return cluster_ids.reshape(-1)
        if len(lead) >= 2 and tuple(cluster_ids.shape) == lead[:1]:
            return cluster_ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
        per_seq = f" or ({lead[0]},) (one per sequence)" if len(lead) >= 2 else ""
        raise ValueError(f"cluster_ids must have shape {lead} (one per token){per_seq}, "
                         f"got {tuple(cluster_ids.shape)}")

    def forward(self, hidden_states: torch.Tensor, cluster_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states (..., H) -> (..., H) in hidden_states' dtype (the autocast dtype under autocast);
        cluster_ids (B,) or hidden_states.shape[:-1]."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1 or \
                hidden_states.shape[-1] != self.hidden_size:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"hidden_states must have shape (..., {self.hidden_size}), got {shape}")
        ids = self.token_cluster_ids(hidden_states, cluster_ids)
        x = hidden_states.reshape(-1, self.hidden_size)
        autocast = x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
        if autocast:
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate, w_gate_up, w_down = (p.to(x.dtype) for p in (self.gate_weight, self.w_gate_up, self.w_down))
        check_moe_inputs(x, ids, gate, w_gate_up, w_down, self.top_k, self.normalize)
        check_index_range("cluster_ids", cluster_ids, self.num_clusters)
        backend = resolve_moe_backend(x.device, x.dtype, self.backend, self.num_experts, self.top_k)
        # the backends run in the dtype they are given: autocast stays outside (the cast above is its)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            y, routing = moe_forward(x, ids, gate, w_gate_up, w_down, self.top_k, self.normalize, backend)
        self.aux_loss = (load_balancing_loss(routing.logits, routing.topk_ids, self.num_experts)
                         if self.training and torch.is_grad_enabled() else None)
        return y.view(hidden_states.shape)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, num_clusters: int, top_k: int = 2,
                   normalize: bool = True) -> ClusterGatedMoE:
        """Experts from equal slices of a dense SwiGLU MLP's intermediate dimension.

        ``mlp`` has ``gate_proj`` (I, H), ``up_proj`` (I, H), ``down_proj`` (H, I) linear layers
        without bias and a SiLU activation (LlamaMLP, Qwen2MLP, MistralMLP). Expert e takes rows
        [e*I/E, (e+1)*I/E) of gate and up and the same columns of down, so the sum of all
        experts with weight 1 equals the dense MLP. The gates start at nn.Linear's default.
        """
        _check_dense_swiglu(mlp)
        gate_w, up_w, down_w = (cast(nn.Linear, getattr(mlp, name)).weight
                                for name in ("gate_proj", "up_proj", "down_proj"))
        dense_i, hidden = gate_w.shape
        check_positive_int("num_experts", num_experts)
        if dense_i % num_experts:
            raise ValueError(f"num_experts={num_experts} must divide the dense intermediate size {dense_i} "
                             f"for init from equal slices")
        expert_i = dense_i // num_experts
        moe = cls(hidden, expert_i, num_experts, num_clusters, top_k, normalize,
                  device=gate_w.device, dtype=gate_w.dtype)
        with torch.no_grad():
            moe.w_gate_up.copy_(torch.cat([gate_w.view(num_experts, expert_i, hidden),
                                           up_w.view(num_experts, expert_i, hidden)], dim=1))
            moe.w_down.copy_(down_w.view(hidden, num_experts, expert_i).permute(1, 0, 2))
        return moe


def _check_dense_swiglu(mlp: nn.Module) -> None:
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
        raise ValueError(f"from_dense needs a SwiGLU MLP with nn.Linear {names} (LlamaMLP-style); "
                         f"got {type(mlp).__name__}")
    if any(getattr(mlp, n).bias is not None for n in names):
        raise ValueError("from_dense needs gate_proj/up_proj/down_proj without bias")
    act = getattr(mlp, "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and "silu" not in type(act).__name__.lower():
        raise ValueError(f"from_dense needs a SiLU-gated MLP (experts are SwiGLU); got activation "
                         f"{type(act).__name__}")


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean of the load-balancing losses of every ClusterGatedMoE in ``model`` from its last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, ClusterGatedMoE) and m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
