"""Swap the MLPs of a Hugging Face causal LM for ClusterGatedMoE layers, and back.

Cluster ids travel as data: ``model(..., cluster_ids=ids)`` and ``model.generate(...,
cluster_ids=ids)`` hand the keyword through transformers' ``**kwargs`` to every decoder layer.
The model's class is given a subclass whose ``forward`` names ``cluster_ids`` (``generate``
accepts only keywords that ``forward`` names), and each patched decoder layer a subclass whose
``forward`` takes ``cluster_ids`` out of its keywords and binds them to its MoE for the
duration of that call. transformers' gradient checkpointing re-runs that same ``forward``
with the same keywords, so the recompute sees the same ids; ``generate`` expands every tensor
keyword for beams and ``num_return_sequences``, so the ids follow their sequences. No global
state is involved.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

from .._checks import check_positive_int
from .layer import ClusterGatedMoE

INITS = ("dense_split", "random")


class MoEMLP(nn.Module):
    """Stands in for a decoder layer's ``mlp``: a ClusterGatedMoE (plus the dense MLP's output
    dropout, for GPT-2) fed with the cluster ids of the enclosing layer's current call."""

    def __init__(self, moe: ClusterGatedMoE, dense: nn.Module, dropout: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()
        self._dense = (dense,)  # kept unregistered (not in state_dict) for restore_dense_mlp
        self._cluster_ids: torch.Tensor | None = None

    @contextlib.contextmanager
    def bind(self, cluster_ids: torch.Tensor | None) -> Iterator[None]:
        previous, self._cluster_ids = self._cluster_ids, cluster_ids
        try:
            yield
        finally:
            self._cluster_ids = previous

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._cluster_ids is None:
            raise ValueError("this model's MLPs are cluster-gated MoE layers: pass cluster_ids=ids (one cluster "
                             "id per sequence, shape (B,)) to model(...) or model.generate(...)")
        return self.dropout(self.moe(hidden_states, self._cluster_ids))


_PATCHED_CLASSES: dict[tuple[type, str], type[nn.Module]] = {}


def _bind_forward(base: type[nn.Module]) -> Callable[..., Any]:
    """Decoder layer: take ``cluster_ids`` out of the keywords and bind it to the layer's MoEMLP."""

    def forward(self, *args, cluster_ids=None, **kwargs):
        with self.mlp.bind(cluster_ids):
            return base.forward(self, *args, **kwargs)

    return forward


def _pass_forward(base: type[nn.Module]) -> Callable[..., Any]:
    """Top-level model: name ``cluster_ids`` in the signature (generate() validates keywords
    against it) and hand it down through transformers' ``**kwargs``."""

    def forward(self, *args, cluster_ids=None, **kwargs):
        if cluster_ids is not None:
            kwargs["cluster_ids"] = cluster_ids
        return base.forward(self, *args, **kwargs)

    # generate() reads forward's signature to decide which inputs (position_ids, ...) to build:
    # show the base signature with cluster_ids added
    functools.update_wrapper(forward, base.forward)
    attributes = vars(forward)
    del attributes["__wrapped__"]
    signature = inspect.signature(base.forward)
    params = list(signature.parameters.values())
    extra = inspect.Parameter("cluster_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    attributes["__signature__"] = signature.replace(parameters=[*params[:at], extra, *params[at:]])
    return forward


def _patch_class(module: nn.Module, make_forward: Callable[[type[nn.Module]], Callable[..., Any]]) -> None:
    """Give ``module`` a subclass of its class with the forward built by ``make_forward``."""
    base = type(module)
    key = (base, make_forward.__name__)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"ClusterGated{base.__name__}", (base,),
                                     {"forward": make_forward(base), "_gavamoe_base": base, "__module__": __name__})
    module.__class__ = _PATCHED_CLASSES[key]


def _unpatch_class(module: nn.Module) -> None:
    if "_gavamoe_base" in type(module).__dict__:
        module.__class__ = vars(type(module))["_gavamoe_base"]


def _mlp_kind(mlp: nn.Module) -> str | None:
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "swiglu"
    if all(hasattr(mlp, n) for n in ("c_fc", "c_proj")):
        return "gpt2"
    return None


def _mlp_of(layer: nn.Module) -> nn.Module:
    return cast(nn.Module, layer.mlp)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module) and _mlp_kind(_mlp_of(m))]


def _build_moe(mlp: nn.Module, kind: str | None, num_experts: int, num_clusters: int, top_k: int,
               intermediate_size: int | None, init: str) -> ClusterGatedMoE:
    if kind == "swiglu":
        weight = cast(nn.Linear, mlp.gate_proj).weight  # [I, H]
        dense_i, hidden = weight.shape
    else:
        weight = cast(nn.Linear, mlp.c_fc).weight  # Conv1D: [H, I]
        hidden, dense_i = weight.shape
    split_i = dense_i // num_experts
    if init == "dense_split":
        if kind == "gpt2":
            raise ValueError("init='dense_split' needs a gated SwiGLU MLP; GPT-2's MLP is c_fc -> GELU -> c_proj "
                             "and cannot be sliced into SwiGLU experts: use init='random'")
        if intermediate_size is not None and intermediate_size != split_i:
            raise ValueError(f"intermediate_size must be None or dense_intermediate / num_experts = {split_i} "
                             f"with init='dense_split', got {intermediate_size}")
        return ClusterGatedMoE.from_dense(mlp, num_experts, num_clusters, top_k)
    expert_i = check_positive_int("intermediate_size", intermediate_size if intermediate_size is not None
                                  else max(1, split_i))
    return ClusterGatedMoE(hidden, expert_i, num_experts, num_clusters, top_k,
                           device=weight.device, dtype=weight.dtype)


def replace_mlp_with_moe(model: nn.Module, num_experts: int, num_clusters: int, top_k: int = 2,
                         intermediate_size: int | None = None, init: str = "dense_split") -> nn.Module:
    """Replace every decoder MLP of a Hugging Face causal LM with a ClusterGatedMoE, in place.

    Args:
        model: a LLaMA-family (LlamaMLP-style gate/up/down: Llama, Qwen2, Mistral, ...) or GPT-2 model.
        num_experts: E experts per layer.
        num_clusters: C gates per layer (one per cluster).
        top_k: experts per token.
        intermediate_size: per-expert I; default dense_intermediate // E.
        init: "dense_split" (experts are equal slices of the dense MLP; SwiGLU MLPs only) or "random".

    Returns the same model. Afterwards ``model(..., cluster_ids=ids)`` and
    ``model.generate(..., cluster_ids=ids)`` take ids of shape (B,), one per sequence.
    ``restore_dense_mlp(model)`` undoes the change.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_positive_int("num_experts", num_experts)
    check_positive_int("num_clusters", num_clusters)
    if any(isinstance(m, MoEMLP) for m in model.modules()):
        raise ValueError("the model's MLPs are already cluster-gated MoE layers; call restore_dense_mlp(model) first")
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"found no LLaMA-style (gate_proj/up_proj/down_proj) or GPT-2 (c_fc/c_proj) MLP to "
                         f"replace in {type(model).__name__}")
    for layer in layers:
        dense = _mlp_of(layer)
        kind = _mlp_kind(dense)
        moe = _build_moe(dense, kind, num_experts, num_clusters, top_k, intermediate_size, init)
        kept = dense if moe.w_down.is_meta else dense.to("cpu")  # a model on the meta device has no data to move
        layer.mlp = MoEMLP(moe, kept, getattr(dense, "dropout", None) if kind == "gpt2" else None)
        _patch_class(layer, _bind_forward)
    if model not in layers and "_gavamoe_base" not in type(model).__dict__:
        _patch_class(model, _pass_forward)
    return model


def restore_dense_mlp(model: nn.Module) -> nn.Module:
    """Undo :func:`replace_mlp_with_moe`: put back the original dense MLPs (as they were before
    the swap, on the device the MoE is on now) and the original decoder layer classes."""
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoEMLP):
            layer.mlp = mlp._dense[0].to(mlp.moe.w_down.device)
            _unpatch_class(layer)
    _unpatch_class(model)
    return model
