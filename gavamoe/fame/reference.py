"""FAME's last layer in plain PyTorch, readable as the maths: one loop over heads and experts, the
router as an explicit softmax. The tests' oracle (in float64) and the benchmark's plain-torch
baseline; the model never imports it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import FameLayer


def fame_layer(layer: FameLayer, x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """r (B, S, H, d) of ``layer`` (no dropout) for x (B, S, D) and mask (B, 1, S, S) bool,
    computed in ``dtype`` (default x's) from the layer's own parameters."""
    dtype = dtype or x.dtype
    p = {name: value.to(dtype) for name, value in layer.named_parameters()}
    x = x.to(dtype)
    B, S, D = x.shape
    H, N, d = layer.heads, layer.experts, layer.head_dim
    wq, bq = p["query.weight"].view(H, N, d, D), p["query.bias"].view(H, N, d)
    wkv, bkv = p["key_value.weight"].view(2, H, d, D), p["key_value.bias"].view(2, H, d)
    heads = []
    for h in range(H):
        k = x @ wkv[0, h].T + bkv[0, h]  # [B, S, d]
        v = x @ wkv[1, h].T + bkv[1, h]
        outputs = []
        for n in range(N):
            q = x @ wq[h, n].T + bq[h, n]
            scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask[:, 0], float("-inf"))
            outputs.append(torch.softmax(scores, dim=-1) @ v)  # [B, S, d]
        logits = torch.cat(outputs, dim=-1) @ p["router"][h].T  # [B, S, N]
        probs = torch.softmax(logits, dim=-1)
        if layer.top_k < N:
            top = probs.topk(layer.top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        f = sum(probs[..., n:n + 1] * outputs[n] for n in range(N))
        heads.append(f)
    f = torch.stack(heads, dim=2)  # [B, S, H, d]
    r = F.layer_norm(f + x.view(B, S, H, d), (d,), p["norm1.weight"], p["norm1.bias"])
    hidden = F.gelu(r @ p["ffn.0.weight"].T + p["ffn.0.bias"]) @ p["ffn.3.weight"].T + p["ffn.3.bias"]
    return F.layer_norm(r + hidden, (d,), p["norm2.weight"], p["norm2.bias"])
