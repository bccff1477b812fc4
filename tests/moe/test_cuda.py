"""The cuda backend's router and routing metadata (csrc/router.cu) against torch and Triton.

GPU only: marked ``gpu`` (skipped without CUDA) and skipped when the extension is not built.
The shared grids of test_route.py and test_experts.py also run the cuda backend through
BACKENDS; these tests add backend-to-backend agreement, the kernels' limits and their
fallbacks, the extension's own input errors, and CUDA-graph capture (no host sync).
"""

from __future__ import annotations

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels._backend import cuda_extension_built
from gavamoe_kernels.moe import torch_impl
from gavamoe_kernels.testing import INT_POISON, assert_same_topk
from tests.helpers import DEVICE, DTYPES
from tests.moe.cases import (
    EXPERT_IDS,
    EXPERT_SHAPES,
    ROUTE_IDS,
    ROUTE_SHAPES,
    expert_inputs,
    reference_probs,
    route_inputs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not cuda_extension_built(),
                       reason="the CUDA extension is not built (pip install --no-build-isolation .)"),
]

# the route grid, plus the paper's LLaMA router (H=4096, E=12, C=4), E and k at the kernel's limits,
# and H not a multiple of the 16-byte vector
CUDA_ROUTE_SHAPES = [*ROUTE_SHAPES, (300, 4096, 12, 4, 2), (65, 256, 256, 3, 8), (40, 4099, 33, 2, 3)]
CUDA_ROUTE_IDS = [f"T{t}-H{h}-E{e}-C{c}-k{k}" for t, h, e, c, k in CUDA_ROUTE_SHAPES]
TOL = 1e-4  # every backend accumulates the same rounded inputs in fp32; only the order differs


def _ext():
    from gavamoe_kernels._extension import extension

    return extension()


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_ROUTE_SHAPES, ids=CUDA_ROUTE_IDS)
def test_cuda_router_agrees_with_torch_and_triton(shape, dtype, id_dtype):
    T, H, E, C, k = shape
    hidden, gate, cids = route_inputs(T, H, E, C, dtype, seed=3, id_dtype=id_dtype)
    cuda = gk.route(hidden, gate, cids, top_k=k, backend="cuda")
    probs64 = reference_probs(hidden, gate, cids)
    assert_same_topk(cuda.topk_ids.cpu(), probs64, k, tol=1e-5 if dtype == torch.float32 else 1e-3)
    for other in ("torch", "triton"):
        r = gk.route(hidden, gate, cids, top_k=k, backend=other)
        torch.testing.assert_close(cuda.logits, r.logits, atol=TOL, rtol=TOL, msg=other)
        same = (cuda.topk_ids == r.topk_ids).all(-1)  # near-tie swaps aside, weights agree
        torch.testing.assert_close(cuda.topk_weights[same], r.topk_weights[same], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("shape", ROUTE_SHAPES[1:], ids=ROUTE_IDS[1:])
def test_cuda_router_gradients_equal_triton(shape, normalize):
    """The cuda backend's router backward is the Triton kernel, fed the CUDA forward."""
    T, H, E, C, k = shape
    hidden, gate, cids = route_inputs(T, H, E, C, torch.float32, seed=5)
    d_w = torch.randn(T, k, device=DEVICE)
    grads = {}
    for backend in ("cuda", "triton"):
        x, w = hidden.clone().requires_grad_(), gate.clone().requires_grad_()
        r = gk.route(x, w, cids, top_k=k, normalize=normalize, backend=backend)
        (r.topk_weights * d_w).sum().backward()
        grads[backend] = (x.grad, w.grad)
    for a, b in zip(grads["cuda"], grads["triton"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=EXPERT_IDS)
def test_cuda_routing_metadata_equals_stable_sort(shape, id_dtype):
    from gavamoe_kernels.moe.cuda_impl import routing_metadata

    E = shape[3]
    _, _, ids, _, _ = expert_inputs(*shape, torch.float32)
    # also many blocks of 256 slots, and the largest E the kernel takes
    for topk_ids, experts in ((ids, E), (torch.randint(0, E, (5000, 2), device=DEVICE), E),
                              (torch.randint(0, 256, (3001, 8), device=DEVICE), 256)):
        topk_ids = topk_ids.to(id_dtype)
        got = routing_metadata(topk_ids, experts)
        want = torch_impl.routing_metadata(topk_ids, experts)
        for name, a, b in zip(("sorted_slots", "slot_pos", "counts"), got, want, strict=True):
            assert a.dtype == torch.int32 and not (a == INT_POISON).any(), name
            assert torch.equal(a, b), name


def test_shapes_past_the_cuda_limits_are_refused_by_name_and_run_triton_when_automatic():
    hidden, gate, cids = route_inputs(50, 64, 300, 2, torch.float32)
    for k in (2, 9):
        with pytest.raises(gk.BackendUnavailableError, match="at most 256 experts"):
            gk.route(hidden, gate, cids, top_k=k, backend="cuda")
        a = gk.route(hidden, gate, cids, top_k=k, backend="auto")
        b = gk.route(hidden, gate, cids, top_k=k, backend="triton")
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.logits, b.logits)
    small_gate = gate[:, :12].contiguous()
    with pytest.raises(gk.BackendUnavailableError, match="top_k up to 8"):
        gk.route(hidden, small_gate, cids, top_k=9, backend="cuda")


def test_moe_runs_on_the_cuda_backend_under_a_cuda_graph():
    """Router, metadata and expert GEMMs launch without a host sync, so the whole MoE captures."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(133, 64, device=DEVICE, generator=g)
    gate = torch.randn(4, 12, 64, device=DEVICE, generator=g)
    w_gate_up = torch.randn(12, 96, 64, device=DEVICE, generator=g) / 8
    w_down = torch.randn(12, 64, 48, device=DEVICE, generator=g) / 7
    cids = torch.randint(0, 4, (133,), device=DEVICE, generator=g)
    args = (x, cids, gate, w_gate_up, w_down)
    eager = gk.cluster_gated_moe(*args, backend="cuda")  # also compiles the Triton kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gk.cluster_gated_moe(*args, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def _bad_route_calls():
    x = torch.randn(5, 16, device=DEVICE)
    w = torch.randn(2, 4, 16, device=DEVICE)
    ids = torch.zeros(5, dtype=torch.long, device=DEVICE)
    return {
        "hidden-rank": ((x[None], w, ids, 2, True), "hidden must have shape"),
        "hidden-on-cpu": ((x.cpu(), w, ids, 2, True), "hidden must be a CUDA tensor"),
        "gate-dtype": ((x, w.half(), ids, 2, True), "gate_weight has dtype"),
        "hidden-int": ((x.long(), w.long(), ids, 2, True), "hidden must have dtype"),
        "gate-H": ((x, w[..., :8], ids, 2, True), "H = hidden.shape"),
        "ids-float": ((x, w, ids.float(), 2, True), "cluster_ids must have dtype"),
        "ids-length": ((x, w, ids[:3], 2, True), "cluster_ids must have shape"),
        "top-k": ((x, w, ids, 5, True), "top_k must be in"),
        "too-many-experts": ((x, torch.randn(2, 257, 16, device=DEVICE), ids, 2, True), "E <= 256"),
    }


@pytest.mark.parametrize("case", list(_bad_route_calls()))
def test_extension_route_rejects_bad_input_with_value_error(case):
    args, message = _bad_route_calls()[case]
    with pytest.raises(ValueError, match=message):
        _ext().route(*args)


def test_extension_metadata_rejects_bad_input_with_value_error():
    ids = torch.zeros(4, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="num_experts must be in"):
        _ext().routing_metadata(ids, 257)
    with pytest.raises(ValueError, match="int32 or int64"):
        _ext().routing_metadata(ids.float(), 4)
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext().routing_metadata(ids.cpu(), 4)
