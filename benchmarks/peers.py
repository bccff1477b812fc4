"""What users would run instead of gavamoe, written the way they would write it. Every peer
takes the same inputs as ours (for the MoE: the same top-k ids and weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---- MoE experts ------------------------------------------------------------------------------


def eager_per_expert_loop(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    """The loop of Hugging Face MoE models and the GaVaMoE reference code: one boolean scan
    (and host sync) per expert, gathered copies, index_add."""
    y = torch.zeros_like(hidden)
    for e in range(w_gate_up.shape[0]):
        tokens, slots = torch.where(topk_ids == e)
        if tokens.numel() == 0:
            continue
        gate, up = (hidden[tokens] @ w_gate_up[e].T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w_down[e].T
        y.index_add_(0, tokens, out * topk_weights[tokens, slots, None].to(hidden.dtype))
    return y


def _grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    return _grouped_mm() is not None


def grouped_mm_moe(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    """PyTorch's grouped GEMM (its Hopper fast path) with the same routing: sort the
    token-slots by expert, gather a permuted copy of the rows, two grouped GEMMs, SwiGLU between,
    scale and scatter-add back."""
    grouped_mm = _grouped_mm()
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    tokens = order // k
    h = grouped_mm(hidden[tokens], w_gate_up.transpose(1, 2), offs=offs)  # [n, 2I]
    gate, up = h.chunk(2, dim=-1)
    out = grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [n, H]
    scale = topk_weights.reshape(-1)[order, None].to(hidden.dtype)
    return torch.zeros_like(hidden).index_add(0, tokens, out * scale)


def megablocks_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("megablocks") is not None


# ---- router -----------------------------------------------------------------------------------


def eager_route_with_metadata(hidden, gate_weight, cluster_ids, top_k: int):
    """The router as eager torch code writes it: a per-token copy of its cluster's gate, fp32
    logits, softmax, top-k, renormalise; then the stable sort of the token-slots by expert."""
    logits = torch.einsum("th,teh->te", hidden.float(), gate_weight[cluster_ids].float())
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_weight.shape[1])
    return weights, ids, logits, order, counts


# ---- Gaussian mixture -------------------------------------------------------------------------


def eager_gmm_log_responsibilities(z, log_pi, mu, logvar):
    """Eager fp32 log-responsibilities in the matmul form users (and scikit-learn) write:
    sum_d (z - mu)^2 / var = z^2 . (1/var) - 2 z . (mu/var) + mu^2 . (1/var), then log_softmax."""
    z = z.float()
    inv_var = torch.exp(-logvar.float())
    maha = z.square() @ inv_var.T - 2 * z @ (mu.float() * inv_var).T + (mu.float().square() * inv_var).sum(-1)
    log_p = log_pi.float() - 0.5 * (z.shape[1] * math.log(2 * math.pi) + logvar.float().sum(-1)) - 0.5 * maha
    return torch.log_softmax(log_p, dim=-1)


def sklearn_mixture(log_pi, mu, logvar):
    """A fitted-looking scikit-learn GaussianMixture (diag) holding the same parameters."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(mu.shape[0], covariance_type="diag")
    weights = torch.softmax(log_pi.double(), 0).cpu().numpy()
    variances = torch.exp(logvar.double()).cpu().numpy()
    gm.weights_, gm.means_, gm.covariances_ = weights, mu.double().cpu().numpy(), variances
    gm.precisions_cholesky_ = 1.0 / variances**0.5
    return gm
