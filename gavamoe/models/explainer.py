"""Stage 2 of GaVaMoE: the multi-gating MoE explainer.

A decoder LLM whose every MLP is a ClusterGatedMoE (gavamoe_kernels.replace_mlp_with_moe) with
one gate per stage-1 cluster. The prompt's ``<user>`` and ``<item>`` positions carry the stage-1
VAE's user and item embeddings projected to the LLM's width; the cluster of the (user, item)
pair, argmax of the VAE's responsibilities, picks the gate in every layer.

Training loss (paper eq. 13): alpha * L_ELBO + (1 - alpha) * NLL(explanation tokens)
+ aux_coef * load-balancing loss of the MoE layers.

Which gate routes a pair is given by the caller (stage 2's fixed table of stage-1 clusters), or,
when it gives none, the VAE's current argmax, computed in fp32 outside autocast.

Ablations: ``multi_gating=False`` gives every cluster one shared gate (C = 1); ``dense=True``
keeps the base LLM's dense MLPs; ``coarse_experts=True`` keeps the gates but replaces the E
fine-grained experts of width I, top-k, by E/k experts of width k*I, top-1 (the paper's "w/o
fine-grained experts": the same total and active expert parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

import gavamoe_kernels as gk

from ..data.text import ITEM_TOKEN, USER_TOKEN, prepare_tokenizer
from ..errors import UserInputError, check_at_least_one, check_model_path
from .vae_gmm import VaeGmm

# Attention projections that LoRA adapts, per architecture family.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj"]


@dataclass
class ExplainerConfig:
    base_model: str | None = None  # None: the embedded tiny LLaMA below, built from a config
    num_clusters: int = 4
    num_experts: int = 12
    top_k: int = 2
    # the paper's 1280 at LLaMA-8B width (4096); None scales it to the base model: H * 1280 / 4096
    expert_intermediate: int | None = None
    multi_gating: bool = True
    dense: bool = False
    coarse_experts: bool = False  # E/k experts k times as wide, top-1 (the paper's ablation)
    lora_rank: int = 0  # > 0: LoRA on the attention projections; the base LLM's other weights freeze
    # the embedded tiny LLaMA
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    dense_intermediate: int = 344
    max_positions: int = 512

    def __post_init__(self):
        check_at_least_one(self, ("num_clusters", "num_experts", "top_k", "hidden_size", "num_layers", "num_heads",
                                  "dense_intermediate", "max_positions"), str)
        if self.top_k > self.num_experts:
            raise UserInputError(f"--top-k must be at most --num-experts={self.num_experts}, got {self.top_k}")
        if self.expert_intermediate is not None and self.expert_intermediate < 1:
            raise UserInputError(f"--expert-intermediate must be at least 1, got {self.expert_intermediate}")
        if self.lora_rank < 0:
            raise UserInputError(f"--lora-rank must be non-negative, got {self.lora_rank}")
        if self.dense and (not self.multi_gating or self.coarse_experts):
            raise UserInputError("--dense has no gates or experts: it cannot be combined with --no-multi-gating "
                                 "or --coarse-experts")
        if self.coarse_experts and self.num_experts % self.top_k:
            raise UserInputError(f"--coarse-experts merges each --top-k={self.top_k} experts into one: "
                                 f"--num-experts={self.num_experts} must be a multiple of it")
        check_model_path(self.base_model)

    @property
    def num_gates(self) -> int:
        return self.num_clusters if self.multi_gating else 1


def expert_intermediate(config: ExplainerConfig, hidden_size: int) -> int:
    """The width of one fine-grained expert."""
    if config.expert_intermediate is not None:
        return config.expert_intermediate
    return max(8, round(hidden_size * 1280 / 4096 / 8) * 8)


def expert_layout(config: ExplainerConfig, hidden_size: int) -> tuple[int, int, int]:
    """(experts, top_k, expert width) of each MoE layer: the configured fine-grained experts, or
    with ``coarse_experts`` E/k experts k times as wide routed top-1, which keeps the total
    (E * I) and the active (k * I) expert width."""
    width = expert_intermediate(config, hidden_size)
    if config.coarse_experts:
        return config.num_experts // config.top_k, 1, width * config.top_k
    return config.num_experts, config.top_k, width


def tiny_llama(config: ExplainerConfig, vocab_size: int, tokenizer) -> nn.Module:
    """A small LLaMA-architecture causal LM from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                        intermediate_size=config.dense_intermediate, num_hidden_layers=config.num_layers,
                        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
                        max_position_embeddings=config.max_positions, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(llama)


def load_language_model(config: ExplainerConfig, tokenizer) -> nn.Module:
    """The base LLM, dense: the tiny LLaMA, or ``config.base_model`` from a local path or the Hub,
    with its embeddings resized for the placeholder tokens."""
    if config.base_model is None:
        return tiny_llama(config, len(tokenizer), tokenizer)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(config.base_model)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    return lm


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    prepare_tokenizer(tokenizer)
    return tokenizer


def add_lora(lm: nn.Module, rank: int) -> None:
    """Freeze ``lm`` and inject LoRA adapters of rank ``rank`` (alpha = 2 * rank) into its
    attention projections; the adapters and any MoE layers (``.moe.``) stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {n for n, _ in lm.named_modules()}
    targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n in names)]
    if not targets:
        raise ValueError(f"found no attention projection ({', '.join(LORA_TARGETS)}) for LoRA in "
                         f"{type(lm).__name__}")
    for p in lm.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), lm)
    for name, p in lm.named_parameters():
        if "lora_" in name or ".moe." in name:
            p.requires_grad_(True)


class Explainer(nn.Module):
    """The stage-1 VAE, the (MoE-patched) LLM and the two embedding projections."""

    def __init__(self, config: ExplainerConfig, vae: VaeGmm, lm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vae = vae
        self.lm = lm
        hidden = lm.get_input_embeddings().embedding_dim
        self.user_proj = nn.Linear(vae.config.embed_dim, hidden)
        self.item_proj = nn.Linear(vae.config.embed_dim, hidden)
        self.user_token_id = tokenizer.convert_tokens_to_ids(USER_TOKEN)
        self.item_token_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if not config.dense:
            experts, top_k, width = expert_layout(config, hidden)
            gk.replace_mlp_with_moe(lm, experts, config.num_gates, top_k, intermediate_size=width, init="random")
        if config.lora_rank > 0:
            add_lora(lm, config.lora_rank)

    @torch.no_grad()
    def cluster_ids(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The stage-1 cluster of each (user, item) pair: argmax of the VAE's responsibilities."""
        return self.vae.assign_clusters(users, items)

    def routed_clusters(self, users: torch.Tensor, items: torch.Tensor, clusters=None) -> torch.Tensor:
        """The clusters that route the pairs: ``clusters`` when the caller gives them (stage 2's
        fixed table), else the VAE's current assignment (:meth:`cluster_ids`)."""
        return clusters if clusters is not None else self.cluster_ids(users, items)

    def gate_ids(self, cluster_ids: torch.Tensor) -> torch.Tensor:
        """The gate that routes each pair in every MoE layer: its cluster, or gate 0 for every
        pair without multi-gating."""
        return cluster_ids if self.config.multi_gating else torch.zeros_like(cluster_ids)

    def input_embeddings(self, input_ids: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, S, H) with every <user> / <item> position replaced by the row's
        projected user / item embedding; vectorised over the batch."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, S, H]
        user = self.user_proj(self.vae.user_vector(users)).to(embeds.dtype)  # [B, H]
        item = self.item_proj(self.vae.item_embedding(items)).to(embeds.dtype)
        embeds = torch.where((input_ids == self.user_token_id)[..., None], user[:, None], embeds)
        return torch.where((input_ids == self.item_token_id)[..., None], item[:, None], embeds)

    def _routing(self, gate_ids: torch.Tensor) -> dict:
        """The keyword the patched LLM routes by (none for the dense ablation)."""
        return {} if self.config.dense else {"cluster_ids": gate_ids}

    def forward(self, input_ids, attention_mask, labels, users, items, ratings,
                alpha: float, beta: float, aux_coef: float, clusters=None) -> dict[str, torch.Tensor]:
        """Stage-2 loss of one batch: input_ids/attention_mask/labels (B, S) from
        gavamoe.data.text.training_batch; users, items (B,) int64; ratings (B,) fp32; clusters
        (B,) int64, the pairs' clusters (default: the VAE's current assignment)."""
        elbo = self.vae.elbo_loss(users, items, ratings, beta)
        gates = self.gate_ids(self.routed_clusters(users, items, clusters))
        out = self.lm(inputs_embeds=self.input_embeddings(input_ids, users, items), attention_mask=attention_mask,
                      labels=labels, **self._routing(gates))
        aux = gk.collect_aux_loss(self.lm) if not self.config.dense else None
        aux = aux if aux is not None else out.loss.new_zeros(())
        loss = alpha * elbo["loss"] + (1 - alpha) * out.loss + aux_coef * aux
        return {"loss": loss, "elbo": elbo["loss"].detach(), "nll": out.loss.detach(), "aux": aux.detach()}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, users, items, gate_ids=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 clusters=None) -> torch.Tensor:
        """Explanations for left-padded prompts (gavamoe.data.text.prompt_batch): the new tokens
        (B, <= max_new_tokens), padded with pad_token_id after EOS. Uses the KV cache.
        ``gate_ids`` (B,): default, the gates of ``clusters`` (B,), by default the VAE's current
        assignment."""
        if gate_ids is None:
            gate_ids = self.gate_ids(self.routed_clusters(users, items, clusters))
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample \
            else {"do_sample": False}
        return self.lm.generate(inputs_embeds=self.input_embeddings(input_ids, users, items),
                                attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                                **sampling, **self._routing(gate_ids))

    def checkpoint(self) -> dict:
        return {"config": asdict(self.config), "vae_config": asdict(self.vae.config),
                "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, tokenizer) -> Explainer:
        from .vae_gmm import VaeGmmConfig

        config = ExplainerConfig(**checkpoint["config"])
        model = cls(config, VaeGmm(VaeGmmConfig.from_saved(checkpoint["vae_config"])),
                    load_language_model(config, tokenizer), tokenizer)
        model.load_state_dict(checkpoint["state_dict"])
        return model
