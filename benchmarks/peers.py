"""What users would run instead of gavamoe, written the way they would write it at its best.
Every peer takes the same inputs as ours (for the MoE: the same top-k ids and weights).

- MoE experts: the eager per-expert loop (Hugging Face, the GaVaMoE reference code); PyTorch's
  grouped GEMM with the same routing, and ``torch.compile`` of it (what a user tries first);
  Liger-Kernel's fused MoE (Triton); MegaBlocks is reported skipped where it is not importable.
- Router: one matmul against all C * E gate rows, then each token's own cluster picked, softmax,
  top-k, renormalisation and the slot sort; and ``torch.compile`` of it.
- Gaussian mixture: eager matmul-form log-sum-exp, ``torch.compile`` of it, scikit-learn.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from benchmarks.common import ON_GPU

if not ON_GPU:  # Liger-Kernel reads this when it loads; the interpreter cannot time autotuning configurations
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")

# ---- torch.compile, counted -----------------------------------------------------------------


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Compiled:
    """``torch.compile(fn, fullgraph=True)`` shared by the rows of one suite, with dynamic shapes
    so that the batch size does not recompile it. Each row records how many graphs it made
    Dynamo compile (``compiles``) and, if compiling failed (a graph break, the recompile limit),
    that it ran eager instead (``fell_back_to_eager``): such a row is never called compiled."""

    def __init__(self, fn, mode: str | None = None):
        self.eager = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=True, mode=mode)
        self.fallback: str | None = None
        self.compiles = 0

    def __call__(self, *args):
        if self.fallback is not None:
            return self.eager(*args)
        before = _graphs_compiled()
        try:
            return self.compiled(*args)
        except Exception as failure:
            self.fallback = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
            return self.eager(*args)
        finally:
            self.compiles += _graphs_compiled() - before

    def info(self, compiles_before: int) -> dict:
        """Figures for the row that ran since ``compiles_before``."""
        return {"compiles": self.compiles - compiles_before, "fell_back_to_eager": self.fallback}


def compiles_so_far(fn) -> int:
    return fn.compiles if isinstance(fn, Compiled) else 0


def compile_info(fn, compiles_before: int) -> dict:
    """The compile figures a row records: for a Compiled peer, its compiles since then and any
    eager fallback; nothing for the others."""
    return fn.info(compiles_before) if isinstance(fn, Compiled) else {}


# ---- MoE experts ------------------------------------------------------------------------------


def _slot_order_and_counts(flat: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-slots sorted stably by expert, and the per-expert counts by index_add (not
    bincount): no host sync, and torch.compile traces it."""
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, device=flat.device, dtype=torch.int32).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts


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
    """PyTorch's grouped GEMM (its Hopper fast path) with the same routing: sort the token-slots
    by expert, gather a permuted copy of the rows, two grouped GEMMs, SwiGLU between, scale and
    scatter-add back."""
    grouped_mm = _grouped_mm()
    k = topk_ids.shape[1]
    order, counts = _slot_order_and_counts(topk_ids.reshape(-1), w_gate_up.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tokens = order // k
    pre = grouped_mm(hidden[tokens], w_gate_up.transpose(1, 2), offs=offs)  # [n, 2I]
    gate, up = pre.chunk(2, dim=-1)
    out = grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [n, H]
    scale = topk_weights.reshape(-1)[order, None].to(hidden.dtype)
    return torch.zeros_like(hidden).index_add(0, tokens, out * scale)


def liger_available() -> str | None:
    """None when Liger-Kernel's fused MoE can run here, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'gavamoe[bench]'; on the GPU machine carry its wheel)"
    if importlib.util.find_spec("liger_kernel.ops.fused_moe") is None:
        return "this liger-kernel has no fused MoE (liger_kernel.ops.fused_moe; it came with 0.8)"
    if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "Liger-Kernel's fused MoE runs on a GPU, or on the CPU under TRITON_INTERPRET=1"
    return None


def liger_fused_moe(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    """Liger-Kernel's LigerFusedMoEFunction: same transformers-v5 layout ((E, 2I, H), (E, H, I)),
    int32 ids, the weights as given."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction.apply(hidden, w_gate_up, w_down, topk_ids.to(torch.int32), topk_weights)


def megablocks_importable() -> bool:
    return importlib.util.find_spec("megablocks") is not None


# ---- router -----------------------------------------------------------------------------------


def eager_route_with_metadata(hidden, gate_weight, cluster_ids, top_k: int):
    """The router as strong eager torch writes it: one matmul of the tokens against all C * E gate
    rows, each token's own cluster picked, fp32 softmax, top-k, renormalise; then the stable sort
    of the token-slots by expert and the per-expert counts (index_add: no host sync)."""
    C, E, H = gate_weight.shape
    all_logits = (hidden @ gate_weight.reshape(C * E, H).T).view(-1, C, E)
    logits = all_logits.gather(1, cluster_ids.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1).float()
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    order, counts = _slot_order_and_counts(ids.reshape(-1), E)
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
