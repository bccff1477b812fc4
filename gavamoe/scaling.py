"""What lets stage 2 train a pretrained 8B base: fp32 master weights under bf16 compute, FSDP2
sharding, and checkpoints that do not depend on how the run was sharded.

Precision. A pretrained base loads in its checkpoint's dtype (bf16 for Llama-3.1-8B). Every
trainable parameter (the new gates and experts, LoRA adapters, the projections, the VAE) is kept
in fp32: that copy is the master AdamW updates, so an update smaller than a bf16 step is not
lost. Frozen base weights stay as loaded. The forward and backward compute in bf16 under autocast
on CUDA, and on the CPU whenever the model holds bf16/fp16 weights (then the frozen and the
trainable weights meet in one dtype there too); a model that is fp32 throughout computes in fp32
on the CPU.

Sharding (``fsdp=True``, under torchrun). Each decoder layer of the LLM is one FSDP2 unit
(``fully_shard``), the rest of the Explainer (VAE, projections, embeddings, head) the root
unit. Parameters are stored sharded in their own dtype (the fp32 masters), all-gathered in the
compute dtype, and gradients are reduce-scattered in fp32. Gloo runs it on CPU processes, NCCL on
GPUs.

Checkpoints. Model and optimizer are saved as full (unsharded) state dicts keyed by parameter
name (torch.distributed.checkpoint.state_dict), gathered to rank 0: the same file with or
without FSDP, so a sharded run resumes unsharded and the other way round, and generation loads a
sharded run's model.pt as any other.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

LOW_PRECISION = (torch.bfloat16, torch.float16)


def keep_fp32_master(model: nn.Module) -> int:
    """Cast every trainable bf16/fp16 parameter of ``model`` to fp32 in place (the master
    weights); frozen parameters keep their dtype. Returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in LOW_PRECISION:
            p.data = p.data.float()
            cast += 1
    return cast


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training: bf16 on CUDA, or on the CPU when any weight of ``model`` (as
    the base loaded, before :func:`keep_fp32_master`) is bf16/fp16; None when it computes in fp32
    throughout."""
    if device.type == "cuda" or any(p.dtype in LOW_PRECISION for p in model.parameters()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``; a no-op context for ``dtype=None``."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def enable_checkpointing(lm: nn.Module) -> None:
    """Gradient (activation) checkpointing of every decoder layer of a Hugging Face causal LM,
    non-reentrant (the MoE layers' cluster ids are kept for the recompute: gavamoe_kernels.moe.hf)."""
    if hasattr(lm, "activation_checkpointing_enable"):  # the newer name; older transformers have only the other
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (LLaMA-family or GPT-2): the modules that
    hold an ``mlp`` (dense or the MoE that replaced it)."""
    return [m for m in lm.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]


def shard(model: nn.Module, lm: nn.Module, dtype: torch.dtype | None, cpu_offload: bool = False) -> nn.Module:
    """FSDP2: every decoder layer of ``lm`` (a submodule of ``model``), then ``model`` as the root;
    all-gathers in ``dtype`` (None: in the parameters' own dtype), gradients reduced in fp32;
    ``cpu_offload`` keeps the sharded parameters and gradients on the host (and with them the
    optimizer step). Needs an initialised process group; ``model`` is sharded in place and returned."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(lm):
        fully_shard(layer, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return model


def grad_sync(model: nn.Module, sync: bool):
    """A context in which backward reduces gradients across ranks only when ``sync``: DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync``; a plain module needs neither."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts, on the CPU, keyed by parameter name. A collective
    under FSDP (every rank calls it; rank 0 receives the tensors, the others empty dicts)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load what :func:`full_state` saved into ``model`` and ``optimizer``, sharded or not (every
    rank passes the full dicts)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def full_model_state(model: nn.Module) -> dict:
    """The full model state dict on the CPU (a collective under FSDP; rank 0 receives it)."""
    return get_model_state_dict(model, options=_FULL)
