"""FAME (Liu, Zhang, Long, WSDM 2025, arXiv 2411.01457) and the SASRec baseline it changes.

Both: item embedding (num_items + 1, D; 0 is padding) plus a learnt position embedding, then L
transformer blocks with causal self-attention (post-LayerNorm: x = LN(x + MHA(x)), x = LN(x +
FFN(x))), scored against every item. SASRec: all L blocks standard, score = h . e_item.

FAME changes only the last block, :class:`FameLayer`. For a position's input x (D) and each
head h of H (width d = D / H):
- keys and values as in multi-head attention, K_h = x W_K[h], V_h = x W_V[h], shared by the head's
  experts;
- N experts, each its own query Q_{h,n} = x W_Q[h,n] and its own causal attention
  o_{h,n} = softmax(Q_{h,n} K_h^T / sqrt(d)) V_h; all H*N run as one batched SDPA call;
- the head's router, softmax over a linear map of the concatenated expert outputs,
  w_h = softmax(G_h [o_{h,1}; ...; o_{h,N}]) (N), gives the head's output f_h = sum_n w_{h,n} o_{h,n}.
  This is ``gk.route`` with gate_weight (H, N, N*d) and cluster = head id (top_k = N: FAME's
  dense routing; top_k < N is our sparse variant);
- each head goes on alone: r_h = LN(f_h + x_h) (x_h: the head's slice of x), then the
  feed-forward block shared across heads, r_h = LN(r_h + FFN(r_h)) (width d);
- each head scores every item against its item sub-embedding, s_h = r_h . (e_item P_h) (P_h:
  D -> d, the per-head projection of the item embedding);
- the gate over heads, g = softmax(W_g [r_1; ...; r_H]) (H), mixes the heads: by default the
  scores, s = sum_h g_h s_h (``head_mix="logits"``), or the probabilities, p = sum_h g_h
  softmax(s_h) (``head_mix="probs"``).
Where the paper leaves it open (which of the two the gate mixes, the residual, N, H, D) these are
our choices; README, FAME.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gavamoe_kernels as gk

from ..errors import UserInputError, check_at_least_one

MODELS = ("fame", "sasrec")
HEAD_MIXES = ("logits", "probs")


@dataclass
class SeqRecConfig:
    num_items: int
    model: str = "fame"
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_experts: int = 4
    top_k: int | None = None  # None: all N experts (FAME's dense routing)
    head_mix: str = "logits"
    max_len: int = 50
    dropout: float = 0.2

    def __post_init__(self):
        if self.model not in MODELS:
            raise UserInputError(f"--model must be one of {', '.join(MODELS)}, got {self.model}")
        if self.head_mix not in HEAD_MIXES:
            raise UserInputError(f"--head-mix must be one of {', '.join(HEAD_MIXES)}, got {self.head_mix}")
        check_at_least_one(self, ("num_items", "dim", "num_layers", "num_heads", "num_experts", "max_len"))
        if self.dim % self.num_heads:
            raise UserInputError(f"--dim {self.dim} must be a multiple of --num-heads {self.num_heads}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise UserInputError(f"--top-k must lie in [1, --num-experts={self.num_experts}], got {self.top_k}")
        if not 0 <= self.dropout < 1:
            raise UserInputError(f"--dropout must lie in [0, 1), got {self.dropout}")

    @property
    def experts_per_token(self) -> int:
        return self.top_k if self.top_k is not None else self.num_experts


def attention_mask(inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool, True = may attend: causal, to real items only (a padding row attends to
    itself so that its softmax is defined; its output is never scored)."""
    S = inputs.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=inputs.device).tril()
    real = (inputs != 0)[:, None, None, :]
    return (causal & real) | torch.eye(S, dtype=torch.bool, device=inputs.device)


def feed_forward(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                         nn.Dropout(dropout))


class Block(nn.Module):
    """A standard transformer block: multi-head causal self-attention and feed-forward, post-LN."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = feed_forward(dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, S, d] each
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = self.norm1(x + F.dropout(self.out(att.transpose(1, 2).reshape(B, S, D)), self.dropout, self.training))
        return self.norm2(x + self.ffn(x))


class FameLayer(nn.Module):
    """FAME's last layer (module docstring): per-head MoE attention routed by ``gk.route`` with
    cluster = head, the shared per-head feed-forward, and the per-head representations r (B, S, H, d)."""

    def __init__(self, dim: int, heads: int, experts: int, top_k: int | None, dropout: float):
        super().__init__()
        d = dim // heads
        self.heads, self.experts, self.top_k, self.head_dim = heads, experts, top_k or experts, d
        self.query = nn.Linear(dim, heads * experts * d)  # W_Q[h, n]: output block h*N + n
        self.key_value = nn.Linear(dim, 2 * dim)
        self.router = nn.Parameter(torch.empty(heads, experts, experts * d))  # G_h: (N, N*d) per head
        nn.init.uniform_(self.router, -1 / math.sqrt(experts * d), 1 / math.sqrt(experts * d))
        self.ffn = feed_forward(d, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = dropout
        self.expert_weights: torch.Tensor | None = None  # (B, S, H, N) of the last call, for plots

    def expert_outputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """o (B, S, H, N, d): every expert's causal attention, H*N heads in one SDPA call (the keys
        and values of head h serve its N query heads, as grouped-query attention)."""
        B, S, _ = x.shape
        H, N, d = self.heads, self.experts, self.head_dim
        q = self.query(x).view(B, S, H * N, d).transpose(1, 2)  # [B, H*N, S, d]
        k, v = self.key_value(x).view(B, S, 2, H, d).permute(2, 0, 3, 1, 4)  # [B, H, S, d] each
        # query head h*N + n reads key/value head h: grouped-query attention, no copy of k and v
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=True)
        return o.transpose(1, 2).reshape(B, S, H, N, d)

    def route(self, o: torch.Tensor) -> torch.Tensor:
        """Dense expert weights w (B, S, H, N) from the concatenated expert outputs, by gk.route
        with cluster = head (renormalised over the top_k kept when top_k < N)."""
        B, S, H, N, d = o.shape
        rows = o.reshape(B * S * H, N * d)
        heads = torch.arange(H, device=o.device).repeat(B * S)
        r = gk.route(rows, self.router.to(rows.dtype), heads, top_k=self.top_k, normalize=True)
        dense = torch.zeros(B * S * H, N, device=o.device, dtype=r.topk_weights.dtype)
        return dense.scatter(1, r.topk_ids, r.topk_weights).view(B, S, H, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        o = self.expert_outputs(x, mask)
        w = self.route(o)
        self.expert_weights = w.detach()
        f = (w.unsqueeze(-1).to(o.dtype) * o).sum(3)  # [B, S, H, d]
        r = self.norm1(F.dropout(f, self.dropout, self.training) + x.view(B, S, self.heads, self.head_dim))
        return self.norm2(r + self.ffn(r))


class SeqRec(nn.Module):
    """SASRec, or FAME when ``config.model == "fame"``: (B, S) item ids -> scores over items."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.config = c = config
        self.item_embedding = nn.Embedding(c.num_items + 1, c.dim, padding_idx=0)
        self.position_embedding = nn.Embedding(c.max_len, c.dim)
        nn.init.normal_(self.item_embedding.weight, std=c.dim ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.input_norm = nn.LayerNorm(c.dim)
        fame = c.model == "fame"
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.dropout) for _ in range(c.num_layers - fame))
        self.fame = FameLayer(c.dim, c.num_heads, c.num_experts, c.top_k, c.dropout) if fame else None
        if fame:
            self.item_projection = nn.Linear(c.dim, c.dim, bias=False)  # P_h: output block h
            self.head_gate = nn.Linear(c.dim, c.num_heads)
        self.head_weights: torch.Tensor | None = None  # (B, S, H) of the last call, for plots

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, D) for SASRec, (B, S, H, d) per-head representations for FAME."""
        S = inputs.shape[1]
        if S > self.config.max_len:
            raise ValueError(f"inputs must have at most max_len={self.config.max_len} positions, got {S}")
        x = self.item_embedding(inputs) + self.position_embedding(torch.arange(S, device=inputs.device))
        x = F.dropout(self.input_norm(x), self.config.dropout, self.training)
        mask = attention_mask(inputs)
        for block in self.blocks:
            x = block(x, mask)
        return self.fame(x, mask) if self.fame is not None else x

    def log_probs(self, inputs: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Log-probabilities over items 1..num_items (column j is item j + 1): (B, S, num_items),
        or (B, num_items) of the last position with ``last_only``."""
        h = self.hidden(inputs)
        if last_only:
            h = h[:, -1:]
        items = self.item_embedding.weight[1:]  # [V, D]
        if self.fame is None:
            scores = F.log_softmax(h @ items.T, dim=-1)
        else:
            B, S, H, d = h.shape
            gate = torch.softmax(self.head_gate(h.reshape(B, S, H * d)), dim=-1)  # [B, S, H]
            self.head_weights = gate.detach()
            sub = self.item_projection(items).view(-1, H, d)  # [V, H, d] item sub-embeddings
            if self.config.head_mix == "logits":  # sum_h g_h r_h . e_h: one matmul over the concatenation
                scores = F.log_softmax((gate.unsqueeze(-1) * h).reshape(B, S, H * d) @ sub.reshape(-1, H * d).T, -1)
            else:
                per_head = F.log_softmax(torch.einsum("bshd,vhd->bshv", h, sub), dim=-1)  # [B, S, H, V]
                scores = torch.logsumexp(per_head + gate.clamp_min(1e-30).log().unsqueeze(-1), dim=2)
        return scores[:, 0] if last_only else scores
