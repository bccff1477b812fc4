"""The memory plan of stage 2: parameters, gradients, optimiser state and activations per GPU,
printed before training starts, and the dry run that builds the model on the meta device (no
weights) so that an 8B configuration can be planned on any machine.

An estimate from counts, not a measurement (stage2/metrics.json records the measured peak on
CUDA beside it). Per GPU, with S = the world size under FSDP and 1 otherwise:
- parameters: frozen weights in their dtype and trainable ones as fp32 masters, / S; plus the
  compute-dtype copies in flight: without FSDP the bf16 copy of every trainable weight that
  autocast (or the MoE layer) makes and keeps for backward; with FSDP the all-gathered root unit
  and two decoder layers (the one computing and the one prefetched);
- gradients: fp32, one per trainable parameter, / S;
- optimiser: AdamW's two fp32 moments per trainable parameter, / S;
- with FSDP's CPU offload the stored parameters, the gradients and the optimiser state lie in
  host memory (reported apart), and the GPU holds the compute-dtype copies in flight only;
- activations of one micro-batch of T = batch x sequence tokens, in the compute dtype, with fused
  attention (no T x T scores): per decoder layer and token 6H + 2H_kv (attention block: norm,
  q, k, v, output, residual) plus 2H + 3kI (MLP or MoE block: norm, gate/up and activation of
  the k active experts of width I, or the dense MLP's I with k = 1, output); with gradient
  checkpointing only each layer's input H is kept and one layer is recomputed at a time; plus
  the head's logits, 10 bytes per vocabulary entry and token (bf16 logits, their fp32 copy for
  the loss and its gradient).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

import gavamoe_kernels as gk

from . import scaling

GIB = 2.0 ** 30
# the dry run's prompt length in tokens (the system sentence, <user> <item> and the rating): the
# sequence is this plus --max-explanation-tokens
DRY_RUN_PROMPT_TOKENS = 64


@dataclass
class MemoryPlan:
    """Bytes per GPU of one stage-2 configuration (an estimate: see the module docstring)."""

    world_size: int
    fsdp: bool
    cpu_offload: bool
    gradient_checkpointing: bool
    tokens_per_micro_batch: int
    frozen_parameters: int  # counts
    trainable_parameters: int
    parameters: float  # bytes per GPU, from here on
    gradients: float
    optimizer: float
    activations: float
    host: float  # bytes per process in host memory (FSDP's CPU offload), not in the GPU total

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        how = f"FSDP over {self.world_size}{', CPU offload' if self.cpu_offload else ''}" if self.fsdp else \
            ("one process" if self.world_size == 1 else f"DDP over {self.world_size} (every rank holds it all)")
        recompute = "on" if self.gradient_checkpointing else "off"
        lines = [f"memory plan per GPU ({how}; gradient checkpointing {recompute}; "
                 f"{self.tokens_per_micro_batch} tokens per micro-batch; an estimate)",
                 f"  parameters   {self.parameters / GIB:8.2f} GiB   ({self.frozen_parameters / 1e9:.3f} B frozen, "
                 f"{self.trainable_parameters / 1e9:.3f} B trainable, fp32 masters)",
                 f"  gradients    {self.gradients / GIB:8.2f} GiB",
                 f"  optimizer    {self.optimizer / GIB:8.2f} GiB   (AdamW, two fp32 moments)",
                 f"  activations  {self.activations / GIB:8.2f} GiB",
                 f"  total        {self.total / GIB:8.2f} GiB"]
        if self.cpu_offload:
            lines.append(f"  host memory  {self.host / GIB:8.2f} GiB per process (sharded parameters, gradients, "
                         f"optimizer)")
        return "\n".join(lines)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def plan_memory(model, *, world_size: int, fsdp: bool, cpu_offload: bool, gradient_checkpointing: bool,
                micro_batch: int, sequence_length: int, compute_bytes: int = 2) -> MemoryPlan:
    """The plan of an Explainer (real or on the meta device) trained as configured; ``compute_bytes``
    is the size of the compute dtype (2 for bf16, 4 without autocast)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    shards = world_size if fsdp else 1
    stored = (_bytes(frozen) + _bytes(trainable)) / shards
    if fsdp:
        layers = scaling.decoder_layers(model.lm)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_layers)
        largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
        in_flight = (root + 2 * largest) * compute_bytes
    else:
        in_flight = n_trainable * compute_bytes if compute_bytes < 4 else 0
    tokens = micro_batch * sequence_length
    gradients, optimizer = 4 * n_trainable / shards, 8 * n_trainable / shards
    host = stored + gradients + optimizer if cpu_offload else 0.0
    if cpu_offload:
        stored = gradients = optimizer = 0.0
    return MemoryPlan(world_size, fsdp, cpu_offload, gradient_checkpointing, tokens, sum(p.numel() for p in frozen),
                      n_trainable, stored + in_flight, gradients, optimizer,
                      _activation_bytes(model, tokens, gradient_checkpointing, compute_bytes), host)


def _activation_bytes(model, tokens: int, gradient_checkpointing: bool, compute_bytes: int) -> float:
    config = model.lm.config
    hidden = config.hidden_size
    kv = hidden * getattr(config, "num_key_value_heads", None) // config.num_attention_heads \
        if getattr(config, "num_key_value_heads", None) else hidden
    if model.config.dense:
        active = getattr(config, "intermediate_size", None) or 4 * hidden
    else:
        moe = next(m for m in model.lm.modules() if isinstance(m, gk.ClusterGatedMoE))
        active = moe.top_k * moe.intermediate_size
    layers = len(scaling.decoder_layers(model.lm))
    per_layer = tokens * compute_bytes * (6 * hidden + 2 * kv + 2 * hidden + 3 * active)
    kept = layers * tokens * compute_bytes * hidden + per_layer if gradient_checkpointing else layers * per_layer
    return kept + tokens * config.vocab_size * (compute_bytes + 8)


class _PlanTokenizer:
    """What the Explainer reads of a tokenizer, for a dry run without one: placeholder ids (the
    memory plan does not depend on them)."""

    pad_token_id = eos_token_id = bos_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


def build_on_meta(stage2_config, vae_config) -> nn.Module:
    """The Explainer of ``stage2_config`` with its VAE of ``vae_config``, on the meta device: the
    base LLM from its config alone (``AutoConfig`` of --base-model, in bf16 as a pretrained base
    loads; the embedded tiny LLaMA in fp32), experts, LoRA and fp32 masters as stage 2 makes them."""
    from dataclasses import replace

    from .models import VaeGmm
    from .models.explainer import Explainer, tiny_llama

    explainer = replace(stage2_config.explainer, num_clusters=vae_config.num_clusters)
    tokenizer = _PlanTokenizer()
    with torch.device("meta"):
        if explainer.base_model is None:
            lm = tiny_llama(explainer, stage2_config.vocab_size, tokenizer)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(explainer.base_model),
                                                  dtype=torch.bfloat16)
        model = Explainer(explainer, VaeGmm(vae_config), lm, tokenizer)
    scaling.keep_fp32_master(model)
    return model


def dry_run(stage1_config, stage2_config, num_users: int, num_items: int, world_size: int) -> MemoryPlan:
    """The memory plan of a stage 2 with these configs on data of this size, over ``world_size``
    processes, from the model built on the meta device (nothing is loaded, trained or written).
    It plans GPUs (bf16 compute, whatever --device says here); the sequence is
    DRY_RUN_PROMPT_TOKENS + max_explanation_tokens long."""
    from .stage1 import vae_config

    # the history tables (8 bytes a training rating) are left out of the plan: num_history 0
    model = build_on_meta(stage2_config, vae_config(stage1_config, num_users, num_items, num_history=0))
    if stage2_config.gradient_checkpointing:
        scaling.enable_checkpointing(model.lm)
    return plan_memory(model, world_size=world_size, fsdp=stage2_config.fsdp, cpu_offload=stage2_config.cpu_offload,
                       gradient_checkpointing=stage2_config.gradient_checkpointing,
                       micro_batch=stage2_config.batch_size,
                       sequence_length=DRY_RUN_PROMPT_TOKENS + stage2_config.max_explanation_tokens, compute_bytes=2)
