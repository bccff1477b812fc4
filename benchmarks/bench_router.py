"""The router alone — cluster-gate lookup, logits, softmax, top-2, renormalisation and the
routing metadata (stable order of the token-slots by expert, per-expert counts) — against the
same steps in eager torch. Outputs are checked against the eager ones before timing."""

from __future__ import annotations

import importlib

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import peers
from benchmarks.common import DEVICE, DTYPE, ON_GPU, our_backends, run_timed
from gavamoe_kernels.testing import assert_same_topk

E, K, C = 12, 2, 4
SHAPES = [(4096, 4096), (32768, 4096), (8192, 768)] if ON_GPU else [(2048, 4096), (8192, 768)]
METADATA = {"torch": "gavamoe_kernels.moe.torch_impl", "triton": "gavamoe_kernels.moe.routing",
            "cuda": "gavamoe_kernels.moe.cuda_impl"}


def _inputs(T, H, full_size):
    T, H = (T, H) if full_size else (37, 40)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(DEVICE, DTYPE)
    gate = (torch.randn(C, E, H, generator=g) / H**0.5).to(DEVICE, DTYPE)
    return hidden, gate, torch.randint(0, C, (T,), generator=g).to(DEVICE)


def _ours(backend):
    metadata = importlib.import_module(METADATA[backend]).routing_metadata

    def route_with_metadata(hidden, gate, cids):
        r = gk.route(hidden, gate, cids, top_k=K, backend=backend)
        return r, metadata(r.topk_ids, E)

    return route_with_metadata


@pytest.mark.parametrize("impl", ["gavamoe-torch", "gavamoe-triton", "gavamoe-cuda", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-H{h}" for t, h in SHAPES])
def test_router(benchmark, full_size, shape, impl):
    hidden, gate, cids = _inputs(*shape, full_size)
    eager = peers.eager_route_with_metadata(hidden, gate, cids, K)
    if impl == "eager":
        fn = lambda: peers.eager_route_with_metadata(hidden, gate, cids, K)
    else:
        backend = impl.removeprefix("gavamoe-")
        if backend not in our_backends(full_size):
            pytest.skip(f"{impl} is not timed on this machine")
        route_with_metadata = _ours(backend)
        fn = lambda: route_with_metadata(hidden, gate, cids)
        r, (sorted_slots, _, counts) = fn()
        probs = torch.softmax(eager[2].double(), -1).cpu()
        assert_same_topk(r.topk_ids.cpu(), probs, K, tol=1e-4)
        torch.testing.assert_close(r.logits, eager[2], atol=1e-3, rtol=1e-3)
        assert torch.equal(counts.long().cpu(), torch.bincount(r.topk_ids.reshape(-1).cpu(), minlength=E))
        flat = r.topk_ids.reshape(-1)
        assert torch.equal(flat[sorted_slots.long()].cpu(), flat.sort().values.cpu())
    T, H = hidden.shape
    # the floor of the router: reading the hidden states once
    run_timed(benchmark, f"router T={T} H={H} E={E} C={C}", impl, "peer" if impl == "eager" else "ours", fn,
              bytes_moved=float(hidden.numel() * hidden.element_size()), flops=2.0 * T * E * H)
