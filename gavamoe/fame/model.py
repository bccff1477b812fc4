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

from ..errors import UserInputError, check_at_least_one, check_finite, check_ranges

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
        check_finite(self)
        if self.model not in MODELS:
            raise UserInputError(f"--model must be one of {', '.join(MODELS)}, got {self.model}")
        if self.head_mix not in HEAD_MIXES:
            raise UserInputError(f"--head-mix must be one of {', '.join(HEAD_MIXES)}, got {self.head_mix}")
        check_at_least_one(self, ("num_items", "dim", "num_layers", "num_heads", "num_experts", "max_len"))
        if self.dim % self.num_heads:
            raise UserInputError(f"--dim {self.dim} must be a multiple of --num-heads {self.num_heads}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise UserInputError(f"--top-k must lie in [1, --num-experts={self.num_experts}], got {self.top_k}")
        check_ranges(self, {"dropout": "lie in [0, 1)"})

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

    GROUPS = 8  # row groups of hidden_at

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
        # at the last call's scored positions, for plots: FAME's head gate (..., H) and expert weights (..., H, N)
        self.head_weights: torch.Tensor | None = None
        self.expert_weights: torch.Tensor | None = None

    def hidden(self, inputs: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """(B, S) ids -> (B, S, D) for SASRec, (B, S, H, d) per-head representations for FAME.
        The columns are positions first_position.. of the model's max_len (see ``hidden_at``)."""
        S = inputs.shape[1]
        if first_position + S > self.config.max_len:
            raise ValueError(f"inputs must have at most max_len={self.config.max_len} positions, got "
                             f"{first_position + S}")
        positions = torch.arange(first_position, first_position + S, device=inputs.device)
        x = self.item_embedding(inputs) + self.position_embedding(positions)
        x = F.dropout(self.input_norm(x), self.config.dropout, self.training)
        mask = attention_mask(inputs)
        for block in self.blocks:
            x = block(x, mask)
        if self.fame is None:
            return x
        x = self.fame(x, mask)
        self.expert_weights = self.fame.expert_weights
        return x

    def hidden_at(self, inputs: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The representations at the (B, S) positions where ``where`` is True, (M, D) or (M, H, d),
        in row-major order, as ``hidden(inputs)[where]`` gives them, without computing the leading
        padding. Inputs are right-aligned and a real item attends to real items only, so a row's
        leading padding columns change none of its other positions: the rows are sorted by how many
        there are and run in GROUPS groups, each without the columns that are padding in all its rows
        (one group when that saves under a quarter of the work). On Amazon Beauty (median 3 items
        of 50) the encoder's time fell about fivefold (profiled, one SASRec epoch). With dropout
        the draws fall differently from ``hidden(inputs)``'s; without it the results agree up to rounding."""
        B, S = inputs.shape
        used = (inputs != 0) | where
        width = torch.where(used.any(1), S - used.int().argmax(1), 0)  # columns from the first used one
        order = torch.argsort(width, stable=True)
        groups = [g for g in order.chunk(min(self.GROUPS, B)) if len(g)]
        widths = [int(width[g].max()) for g in groups]
        if sum(w * len(g) for w, g in zip(widths, groups, strict=True)) > 0.75 * B * max(widths):
            groups, widths = [torch.arange(B, device=inputs.device)], [max(widths)]
        index = torch.full_like(inputs, -1)
        index[where] = torch.arange(int(where.sum()), device=inputs.device)
        picked, experts, at = [], [], []
        for rows, w in zip(groups, widths, strict=True):
            w = max(w, 1)
            h = self.hidden(inputs[rows, S - w:], first_position=S - w)
            keep = where[rows, S - w:]
            picked.append(h[keep])
            at.append(index[rows, S - w:][keep])
            if self.fame is not None:
                experts.append(self.expert_weights[keep])  # hidden() set them for this group
        back = torch.argsort(torch.cat(at))
        if self.fame is not None:
            self.expert_weights = torch.cat(experts)[back]
        return torch.cat(picked)[back]

    def log_probs(self, inputs: torch.Tensor, last_only: bool = False,
                  where: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities over items 1..num_items (column j is item j + 1): (B, S, num_items),
        (B, num_items) of the last position with ``last_only``, or (M, num_items) of the M positions
        where the (B, S) bool mask ``where`` is True. Scoring every item is the costly part, so
        training scores only its target positions (on Amazon Beauty 12% of them are real items),
        and both these forms compute only those positions' representations (``hidden_at``)."""
        if last_only:
            where = torch.zeros_like(inputs, dtype=torch.bool)
            where[:, -1] = True
        return self.score(self.hidden(inputs) if where is None else self.hidden_at(inputs, where))

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (..., num_items) of representations (..., D), or for FAME (..., H, d)."""
        items = self.item_embedding.weight[1:]  # [V, D]
        if self.fame is None:
            return F.log_softmax(h @ items.T, dim=-1)
        H, d = h.shape[-2:]
        gate = torch.softmax(self.head_gate(h.flatten(-2)), dim=-1)  # [..., H]
        self.head_weights = gate.detach()
        sub = self.item_projection(items).view(-1, H, d)  # [V, H, d] item sub-embeddings
        if self.config.head_mix == "logits":  # sum_h g_h r_h . e_h: one matmul over the concatenation
            return F.log_softmax((gate.unsqueeze(-1) * h).flatten(-2) @ sub.reshape(-1, H * d).T, -1)
        per_head = F.log_softmax(torch.einsum("...hd,vhd->...hv", h, sub), dim=-1)  # [..., H, V]
        return torch.logsumexp(per_head + gate.clamp_min(1e-30).log().unsqueeze(-1), dim=-2)
