"""FAME's last layer, forward + backward (d x and every parameter's gradient from an upstream
gradient on the per-head representations), at d = 64 and d = 256, batch 256, length 50, H = 2
heads of N = 4 experts: ours (the H*N expert attentions in one SDPA call, the per-head routers
as one ``gk.route`` with cluster = head) against the plain-torch layer (a loop over heads and
experts, the router as an explicit softmax: gavamoe/fame/reference.py). Both are checked against
that layer in float64 first. Tiny shapes without --benchmark (a correctness smoke)."""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.common import DEVICE, DTYPE, check_all, generator, record_check, run_timed
from gavamoe.fame import reference
from gavamoe.fame.model import FameLayer, attention_mask

B, S, H, N = 256, 50, 2, 4
DIMS = [64, 256]
IMPLS = ["gavamoe", "plain torch"]


@functools.lru_cache(maxsize=2)
def _case(dim, full_size):
    b, s, d = (B, S, dim) if full_size else (5, 9, dim // 8)
    torch.manual_seed(0)
    layer = FameLayer(d, H, N, None, dropout=0.0).to(DEVICE, DTYPE)
    g = generator(1)
    ids = torch.randint(1, 1000, (b, s), device=DEVICE, generator=g)
    ids[: b // 4, : s // 3] = 0  # a quarter of the rows left-padded
    x = torch.randn(b, s, d, device=DEVICE, generator=g).to(DTYPE)
    grad = torch.randn(b, s, H, d // H, device=DEVICE, generator=g).to(DTYPE)
    return layer, x, attention_mask(ids), grad


def _gradients(fn, layer, x, mask, grad, dtype):
    """d x and every parameter's gradient of fn's output against ``grad``, with the layer's
    parameters and x taken in ``dtype``."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().to(dtype).requires_grad_(True) for p in layer.parameters()]
    xs = x.detach().to(dtype).requires_grad_(True)
    with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, params, strict=True))):
        out = fn(layer, xs, mask)
    return torch.autograd.grad(out, [xs, *params], grad.to(dtype)), names


def _plain(layer, x, mask):
    return reference.fame_layer(layer, x, mask)


def _ours(layer, x, mask):
    return layer(x, mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dim", DIMS, ids=[f"d{d}" for d in DIMS])
def test_fame_layer_forward_backward(benchmark, full_size, dim, impl):
    layer, x, mask, grad = _case(dim, full_size)
    fn = _ours if impl == "gavamoe" else _plain
    want, names = _gradients(_plain, layer, x, mask, grad, torch.float64)
    base, _ = _gradients(_plain, layer, x, mask, grad, DTYPE)
    record_check(benchmark, "ours" if impl == "gavamoe" else "peer",
                 lambda: check_all(["d x", *[f"d {n}" for n in names]],
                                   _gradients(fn, layer, x, mask, grad, DTYPE)[0], want, base, DTYPE))
    xs = x.detach().clone().requires_grad_(True)

    def step():
        layer.zero_grad(set_to_none=True)
        xs.grad = None
        fn(layer, xs, mask).backward(grad)

    b, s, d = x.shape
    run_timed(benchmark, f"FAME last layer forward+backward B={b} S={s} d={d} H={H} N={N}", impl,
              "ours" if impl == "gavamoe" else "peer", step)
