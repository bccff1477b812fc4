"""gk.route against the float64 reference: values, ties, gradients, NaN isolation, bad input."""

from __future__ import annotations

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels.moe import reference as ref
from gavamoe_kernels.testing import assert_close_to_reference, assert_same_topk
from tests.helpers import ATOL, BACKENDS, DEVICE, DTYPES, LAYOUTS, expect_refusal, with_layout
from tests.moe.cases import ROUTE_IDS as SHAPE_IDS
from tests.moe.cases import ROUTE_SHAPES as SHAPES
from tests.moe.cases import reference_probs
from tests.moe.cases import route_inputs as make_inputs


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_route_forward_matches_reference(shape, backend, dtype, normalize):
    T, H, E, C, k = shape
    hidden, gate, cids = make_inputs(T, H, E, C, dtype, seed=T + E)
    with expect_refusal(backend, dtype) as refused:
        r = gk.route(hidden, gate, cids, top_k=k, normalize=normalize, backend=backend)
    if refused:
        return
    assert r.topk_weights.dtype == torch.float32 and r.logits.dtype == torch.float32
    assert r.topk_ids.shape == (T, k) and r.topk_weights.shape == (T, k) and r.logits.shape == (T, E)
    _, _, l64 = ref.route(hidden.double().cpu(), gate.double().cpu(), cids.cpu(), k, normalize)
    w_base, _, l_base = ref.route(hidden.cpu(), gate.cpu(), cids.cpu(), k, normalize)
    assert_close_to_reference("logits", r.logits.cpu(), l64, l_base, ATOL[dtype])
    assert_same_topk(r.topk_ids.cpu(), reference_probs(hidden, gate, cids), k, tol=1e-5 if dtype == torch.float32
                     else 1e-3)
    # weights at the ids the kernel chose, so a legitimate near-tie swap is not an error
    probs64 = reference_probs(hidden, gate, cids)
    chosen = probs64.gather(1, r.topk_ids.cpu())
    if normalize:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    assert_close_to_reference("topk_weights", r.topk_weights.cpu(), chosen, w_base, ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_expert_id(backend):
    hidden, gate, cids = make_inputs(9, 24, 6, 2, torch.float32)
    r = gk.route(hidden, torch.zeros_like(gate), cids, top_k=3, backend=backend)
    assert r.topk_ids.tolist() == [[0, 1, 2]] * 9
    torch.testing.assert_close(r.topk_weights, torch.full((9, 3), 1 / 3, device=DEVICE))
    # two experts tied at the top: the lower id comes first
    gate2 = torch.zeros_like(gate)
    gate2[:, 4] = gate2[:, 2] = hidden.mean(0) / hidden.mean(0).norm() ** 2
    r2 = gk.route(hidden.mean(0, keepdim=True).expand(9, -1).contiguous(), gate2, cids, top_k=2, backend=backend)
    assert r2.topk_ids.tolist() == [[2, 4]] * 9


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_route_gradients(shape, backend, dtype, normalize):
    """d hidden and d gate_weight from upstream gradients on both topk_weights and logits."""
    T, H, E, C, k = shape
    hidden, gate, cids = make_inputs(T, H, E, C, dtype, seed=7)
    g = torch.Generator().manual_seed(1)
    d_w, d_l = torch.randn(T, k, generator=g), torch.randn(T, E, generator=g)

    def grads(x, w, route_fn):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        weights, logits = route_fn(x, w)
        ((weights * d_w.to(weights)).sum() + (logits * d_l.to(logits)).sum()).backward()
        return x.grad, w.grad

    def kernel(x, w):
        r = gk.route(x, w, cids, k, normalize, backend=backend)
        return r.topk_weights, r.logits

    def plain(x, w):
        weights, _, logits = ref.route(x, w, cids.cpu(), k, normalize)
        return weights, logits

    dx, dgate = grads(hidden, gate, kernel)
    dx64, dgate64 = grads(hidden.double().cpu(), gate.double().cpu(), plain)
    dx_base, dgate_base = grads(hidden.cpu(), gate.cpu(), plain)
    assert_close_to_reference("d hidden", dx.cpu(), dx64, dx_base, ATOL[dtype])
    assert_close_to_reference("d gate_weight", dgate.cpu(), dgate64, dgate_base, ATOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hidden_layout_gives_the_reference(backend, layout):
    T, H, E, C, k = SHAPES[3]
    hidden, gate, cids = make_inputs(T, H, E, C, torch.float32, seed=8)
    x = with_layout(hidden, layout).requires_grad_()
    r = gk.route(x, gate, cids, top_k=k, backend=backend)
    d_w = torch.randn(T, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (r.topk_weights * d_w).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    w64, _, l64 = ref.route(x64, gate.double().cpu(), cids.cpu(), k)
    (w64 * d_w.double().cpu()).sum().backward()
    assert_same_topk(r.topk_ids.cpu(), reference_probs(x.detach(), gate, cids), k)
    torch.testing.assert_close(r.logits.double().cpu(), l64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter computing on the NaN row
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_token_changes_only_its_own_routing(backend):
    hidden, gate, cids = make_inputs(20, 24, 7, 3, torch.float32)
    clean = gk.route(hidden, gate, cids, top_k=2, backend=backend)
    hidden[5, 3] = float("nan")
    dirty = gk.route(hidden, gate, cids, top_k=2, backend=backend)
    others = torch.arange(20) != 5
    assert torch.equal(dirty.topk_ids[others], clean.topk_ids[others])
    assert torch.equal(dirty.topk_weights[others], clean.topk_weights[others])
    assert torch.isnan(dirty.topk_weights[5]).all()
    ids5 = dirty.topk_ids[5]
    assert ((ids5 >= 0) & (ids5 < 7)).all() and ids5[0] != ids5[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_strided_cluster_ids(backend):
    hidden, gate, cids = make_inputs(17, 24, 5, 3, torch.float32)
    a = gk.route(hidden, gate, cids, backend=backend)
    b = gk.route(hidden, gate, cids.int(), backend=backend)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)
    strided = torch.stack([cids, cids], dim=1)[:, 0]  # stride 2
    c = gk.route(hidden, gate, strided, backend=backend)
    assert torch.equal(a.topk_ids, c.topk_ids) and torch.equal(a.topk_weights, c.topk_weights)


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("only one backend on this machine")
    hidden, gate, cids = make_inputs(129, 72, 13, 4, torch.float32)
    results = [gk.route(hidden, gate, cids, backend=b) for b in BACKENDS]
    for r in results[1:]:
        assert torch.equal(r.topk_ids, results[0].topk_ids)
        torch.testing.assert_close(r.topk_weights, results[0].topk_weights, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r.logits, results[0].logits, atol=1e-5, rtol=1e-5)


def _bad_route_cases():
    hidden, gate, cids = make_inputs(6, 16, 4, 3, torch.float32)
    return {
        "hidden-rank": (dict(hidden=hidden[None]), "hidden must have shape (T, H)"),
        "gate-H": (dict(gate_weight=gate[:, :, :8]), "gate_weight must have shape (C, E, H)"),
        "gate-rank": (dict(gate_weight=gate[0]), "gate_weight must have shape (C, E, H)"),
        "ids-length": (dict(cluster_ids=cids[:5]), "cluster_ids must have shape (T,)"),
        "ids-float": (dict(cluster_ids=cids.float()), "cluster_ids must have dtype"),
        "ids-range": (dict(cluster_ids=cids + 3), "cluster_ids must hold values in [0, 3)"),
        "ids-negative": (dict(cluster_ids=cids - 3), "cluster_ids must hold values in [0, 3)"),
        "top_k-zero": (dict(top_k=0), "top_k must be a positive int"),
        "top_k-large": (dict(top_k=5), "top_k must be in [1, E=4]"),
        "normalize-str": (dict(normalize="yes"), "normalize must be a bool, got 'yes'"),  # was the op's RuntimeError
        "dtype-mix": (dict(gate_weight=gate.double()), "gate_weight must have dtype"),
        "int-hidden": (dict(hidden=hidden.long()), "hidden must have dtype"),
        "mixed-dtype": (dict(gate_weight=gate.half()), "gate_weight has dtype"),
        "meta-device": (dict(gate_weight=gate.to("meta")), "gate_weight is on meta"),
    }, dict(hidden=hidden, gate_weight=gate, cluster_ids=cids, top_k=2)


@pytest.mark.parametrize("case", list(_bad_route_cases()[0]))
def test_bad_route_input_raises_value_error(case):
    cases, good = _bad_route_cases()
    change, message = cases[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gk.route(**{**good, **change})
