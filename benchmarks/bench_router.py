"""The router alone (cluster-gate lookup, logits, softmax, top-2, renormalisation and the
routing metadata) against the strongest eager form (one matmul against all C * E gate rows, the
token's own cluster picked) and ``torch.compile`` of it; forward, and forward + backward (d
hidden, d gate_weight from upstream gradients on the weights and the logits). Every row is
checked against the float64 reference first: top-k ids equal up to near-ties, logits, weights
and gradients by the STYLE.md rule. The limit: a copy whose bytes equal reading the hidden
states once."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import model, peers
from benchmarks.common import (
    DEVICE,
    DTYPE,
    ON_GPU,
    CheckFailed,
    check_all,
    generator,
    our_backends,
    record_check,
    run_timed,
)
from gavamoe_kernels.moe import reference
from gavamoe_kernels.testing import assert_same_topk

E, K, C = 12, 2, 4
SHAPES = [(4096, 4096), (32768, 4096), (8192, 768)] if ON_GPU else [(2048, 4096), (8192, 768)]
METADATA = {"torch": "gavamoe_kernels.moe.torch_impl", "triton": "gavamoe_kernels.moe.metadata",
            "cuda": "gavamoe_kernels.moe.cuda_impl"}
IMPLS = ["gavamoe-torch", "gavamoe-triton", "gavamoe-cuda", "eager", "torch.compile(eager)"]


def router_inputs(T, H, full_size):
    T, H = (T, H) if full_size else (37, 40)
    g = generator(0)
    hidden = torch.randn(T, H, device=DEVICE, generator=g).to(DTYPE)
    gate = (torch.randn(C, E, H, device=DEVICE, generator=g) / H**0.5 * 3).to(DTYPE)
    return hidden, gate, torch.randint(0, C, (T,), device=DEVICE, generator=g)


def _ours(backend):
    metadata = importlib.import_module(METADATA[backend]).routing_metadata

    def route_with_metadata(hidden, gate, cids):
        r = gk.route(hidden, gate, cids, top_k=K, backend=backend)
        sorted_slots, _, counts = metadata(r.topk_ids, E)
        return r.topk_weights, r.topk_ids, r.logits, sorted_slots, counts

    return route_with_metadata


_eager = functools.partial(peers.eager_route_with_metadata, top_k=K)


@functools.cache
def _compiled_router() -> peers.Compiled:
    return peers.Compiled(_eager)


def _function(impl, full_size):
    if impl == "eager":
        return "peer", _eager
    if impl == "torch.compile(eager)":
        return "peer", _compiled_router()
    backend = impl.removeprefix("gavamoe-")
    if backend not in our_backends(full_size):
        pytest.skip(f"{impl} is not timed on this machine")
    return "ours", _ours(backend)


@functools.lru_cache(maxsize=1)
def _reference(shape, full_size):
    """Inputs, upstream gradients, and the float64 / plain-DTYPE routing and gradients."""
    hidden, gate, cids = router_inputs(*shape, full_size)
    g = generator(5)
    d_w = torch.randn(hidden.shape[0], K, device=DEVICE, generator=g)
    d_l = torch.randn(hidden.shape[0], E, device=DEVICE, generator=g)

    def run(dtype):
        x, w = hidden.detach().to(dtype).requires_grad_(), gate.detach().to(dtype).requires_grad_()
        weights, ids, logits = reference.route(x, w, cids, K)
        ((weights * d_w.to(dtype)).sum() + (logits * d_l.to(dtype)).sum()).backward()
        return weights.detach(), ids, logits.detach(), x.grad, w.grad

    return run(torch.float64), run(DTYPE), (hidden, gate, cids, d_w, d_l)


def _check_routing(out, want, base) -> str:
    weights, ids, logits, order, counts = out
    try:
        assert_same_topk(ids.cpu(), torch.softmax(want[2], -1).cpu(), K, tol=1e-4 if DTYPE != torch.float32 else 1e-6)
    except AssertionError as failure:
        raise CheckFailed(f"top-k ids: {failure}") from failure
    flat = ids.reshape(-1)
    if not (torch.equal(counts.long(), torch.bincount(flat, minlength=E))
            and torch.equal(flat[order.long()], flat.sort().values)):
        raise CheckFailed("routing metadata: counts or slot order differ from a stable sort of the ids")
    # weights at the ids the row chose, so a legitimate near-tie swap is not an error
    chosen = torch.softmax(want[2], -1).gather(1, ids.long())
    return check_all(("logits", "topk_weights"), (logits, weights), (want[2], chosen / chosen.sum(-1, keepdim=True)),
                     (base[2], base[0]), DTYPE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-H{h}" for t, h in SHAPES])
def test_router(benchmark, full_size, rates, shape, impl):
    role, fn = _function(impl, full_size)
    want, base, (hidden, gate, cids, _, _) = _reference(shape, full_size)
    compiles_before = peers.compiles_so_far(fn)
    with torch.no_grad():
        record_check(benchmark, role, lambda: _check_routing(fn(hidden, gate, cids), want, base))
    T, H = hidden.shape
    info = peers.compile_info(fn, compiles_before)
    prediction = (model.predict(model.router_kernels(T, H, E, C, K, hidden.element_size()), rates)
                  if impl in ("gavamoe-triton", "gavamoe-cuda") else None)
    with torch.no_grad():
        run_timed(benchmark, f"router T={T} H={H} E={E} C={C}", impl, role, lambda: fn(hidden, gate, cids),
                  bytes_moved=float(hidden.numel() * hidden.element_size()), flops=2.0 * T * E * H,
                  prediction=prediction, **info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-H{h}" for t, h in SHAPES])
def test_router_forward_backward(benchmark, full_size, rates, shape, impl):
    role, fn = _function(impl, full_size)
    want, base, (hidden, gate, cids, d_w, d_l) = _reference(shape, full_size)
    x, w = hidden.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    compiles_before = peers.compiles_so_far(fn)

    def step():
        x.grad = w.grad = None
        weights, _, logits, _, _ = fn(x, w, cids)
        ((weights * d_w).sum() + (logits * d_l).sum()).backward()
        return x.grad, w.grad

    record_check(benchmark, role, lambda: check_all(("d hidden", "d gate_weight"), step(), want[3:], base[3:], DTYPE))
    T, H = hidden.shape
    info = peers.compile_info(fn, compiles_before)
    prediction = (model.predict(model.router_kernels(T, H, E, C, K, hidden.element_size(), backward=True), rates)
                  if impl == "gavamoe-triton" else None)
    run_timed(benchmark, f"router forward+backward T={T} H={H} E={E} C={C}", impl, role, step,
              bytes_moved=float(3 * hidden.numel() * hidden.element_size()), flops=6.0 * T * E * H,
              prediction=prediction, **info)


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-H{h}" for t, h in SHAPES])
def test_router_floor(benchmark, full_size, shape, direction):
    """A copy whose read + write equals reading the hidden states once (forward; three times for
    forward + backward: the forward, d hidden's write and d gate's read)."""
    hidden = router_inputs(*shape, full_size)[0]
    T, H = hidden.shape
    times = 1 if direction == "forward" else 3
    src = torch.empty(times * hidden.numel() * hidden.element_size() // 2, device=DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    case = f"router T={T} H={H} E={E} C={C}" if direction == "forward" else \
        f"router forward+backward T={T} H={H} E={E} C={C}"
    run_timed(benchmark, case, "copy (read+write)", "limit", lambda: dst.copy_(src), bytes_moved=float(2 * src.numel()))
