"""MoE experts on the CPU: the torch backend against the eager per-expert loop users would write
(the loop of Hugging Face MoE models and of the GaVaMoE reference code). Same inputs, same
top-k ids and weights; each output is checked against the loop's before it is timed.

GPU suites (Triton, grouped_mm, MegaBlocks; routing; GMM) arrive with the benchmark issue.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gavamoe_kernels as gk


def eager_per_expert_loop(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    """The common eager implementation: one boolean scan and host sync per expert."""
    y = torch.zeros_like(hidden)
    for e in range(w_gate_up.shape[0]):
        tokens, slots = torch.where(topk_ids == e)
        if tokens.numel() == 0:
            continue
        gate, up = (hidden[tokens] @ w_gate_up[e].T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w_down[e].T
        y.index_add_(0, tokens, out * topk_weights[tokens, slots, None].to(hidden.dtype))
    return y


# (T, H, I, E, k): GPT-2-sized and LLaMA-sized fine-grained experts, scaled to a 2-core CPU
FULL = {"gpt2-T2048": (2048, 768, 256, 12, 2), "llama-T512": (512, 4096, 1280, 12, 2)}
TINY = {"gpt2-T2048": (33, 48, 16, 12, 2), "llama-T512": (17, 64, 24, 12, 2)}


def _inputs(T, H, I, E, k):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    gate = torch.randn(2, E, H, generator=g) / H**0.5
    r = gk.route(hidden, gate, torch.randint(0, 2, (T,), generator=g), top_k=k, backend="torch")
    return (hidden, r.topk_weights, r.topk_ids, torch.randn(E, 2 * I, H, generator=g) / H**0.5,
            torch.randn(E, H, I, generator=g) / I**0.5)


IMPLS = {"gavamoe-torch": lambda *a: gk.moe_experts(*a, backend="torch"), "eager-loop": eager_per_expert_loop}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(FULL))
def test_moe_experts_forward_cpu(benchmark, full_size, shape, impl):
    inputs = _inputs(*(FULL if full_size else TINY)[shape])
    fn = IMPLS[impl]
    torch.testing.assert_close(fn(*inputs), eager_per_expert_loop(*inputs), atol=1e-4, rtol=1e-4)
    benchmark.group = f"moe_experts forward {shape}"
    with torch.inference_mode():
        benchmark(fn, *inputs)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(FULL))
def test_moe_experts_forward_backward_cpu(benchmark, full_size, shape, impl):
    hidden, weights, ids, w1, w2 = _inputs(*(FULL if full_size else TINY)[shape])
    leaves = [t.requires_grad_() for t in (hidden, weights, w1, w2)]
    d_y = torch.randn_like(hidden)

    def step(fn):
        for t in leaves:
            t.grad = None
        (fn(hidden, weights, ids, w1, w2) * d_y).sum().backward()
        return [t.grad for t in leaves]

    for got, want in zip(step(IMPLS[impl]), step(eager_per_expert_loop), strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    benchmark.group = f"moe_experts forward+backward {shape}"
    benchmark(step, IMPLS[impl])
