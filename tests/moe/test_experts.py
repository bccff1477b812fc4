"""gk.moe_experts and gk.cluster_gated_moe against the float64 reference, and the custom ops."""

from __future__ import annotations

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels.moe import reference as ref
from gavamoe_kernels.moe import torch_impl
from gavamoe_kernels.moe.ops import _experts_fwd, _route_fwd
from gavamoe_kernels.testing import INT_POISON, assert_close_to_reference
from tests.helpers import ATOL, BACKENDS, DEVICE, DTYPES, LAYOUTS, expect_refusal, with_layout
from tests.moe.cases import EXPERT_IDS as SHAPE_IDS
from tests.moe.cases import EXPERT_SHAPES as SHAPES
from tests.moe.cases import expert_inputs as make_inputs


def _grads(fn, inputs, d_y):
    hidden, weights, ids, w1, w2 = (t.clone() for t in inputs)
    leaves = [hidden, weights, w1, w2]
    for t in leaves:
        t.requires_grad_()
    y = fn(hidden, weights, ids, w1, w2)
    if y.requires_grad:  # the reference has no graph at T = 0: nothing reaches y
        (y * d_y.to(y)).sum().backward()
    return y.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _as(inputs, dtype, device="cpu"):
    hidden, weights, ids, w1, w2 = inputs
    return hidden.to(device, dtype), weights.to(device), ids.to(device), w1.to(device, dtype), w2.to(device, dtype)


def _check_fp32_against_reference(fn, inputs, d_y) -> None:
    """fn's output and four gradients against float64 by the STYLE.md rule (fp32 inputs)."""
    y, grads = _grads(fn, inputs, d_y)
    y64, grads64 = _grads(ref.moe_experts, _as(inputs, torch.float64), d_y)
    y_base, grads_base = _grads(ref.moe_experts, _as(inputs, torch.float32), d_y)
    assert y.is_contiguous()
    assert_close_to_reference("y", y.cpu(), y64, y_base, ATOL[torch.float32])
    for name, g, g64, gb in zip(("d hidden", "d topk_weights", "d w_gate_up", "d w_down"), grads, grads64,
                                grads_base, strict=True):
        assert_close_to_reference(name, g.cpu(), g64, gb, ATOL[torch.float32] * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_moe_experts_forward_and_gradients(shape, backend, dtype):
    T, H, _, E, _, _ = shape
    inputs = make_inputs(*shape, dtype, seed=T + E)
    d_y = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    with expect_refusal(backend, dtype) as refused:
        y, grads = _grads(lambda *a: gk.moe_experts(*a, backend=backend), inputs, d_y)
    if refused:
        return
    y64, grads64 = _grads(ref.moe_experts, _as(inputs, torch.float64), d_y)
    y_base, grads_base = _grads(ref.moe_experts, _as(inputs, dtype), d_y)
    assert y.dtype == dtype
    assert_close_to_reference("y", y.cpu(), y64, y_base, ATOL[dtype])
    for name, g, g64, gb in zip(("d hidden", "d topk_weights", "d w_gate_up", "d w_down"), grads, grads64,
                                grads_base, strict=True):
        assert g.dtype == gb.dtype, name
        assert_close_to_reference(name, g.cpu(), g64, gb, ATOL[dtype] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_cluster_gated_moe_matches_reference(shape, backend):
    T, H, _, E, k, _ = shape
    hidden, _, _, w1, w2 = make_inputs(*shape, torch.float32, seed=11)
    g = torch.Generator().manual_seed(5)
    gate = (torch.randn(3, E, H, generator=g) / H**0.5).to(DEVICE)
    cids = torch.randint(0, 3, (T,), generator=g).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (hidden, gate, w1, w2)]
    y = gk.cluster_gated_moe(leaves[0], cids, leaves[1], leaves[2], leaves[3], top_k=k, backend=backend)
    y.square().sum().backward()
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (hidden, gate, w1, w2)]
    y64 = ref.cluster_gated_moe(leaves64[0], cids.cpu(), leaves64[1], leaves64[2], leaves64[3], top_k=k)
    y64.square().sum().backward()
    torch.testing.assert_close(y.detach().cpu().double(), y64, atol=1e-5, rtol=1e-4)
    for a, b in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_routing_metadata_equals_stable_sort(shape):
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not runnable here")
    from gavamoe_kernels.moe.metadata import SLOT_BLOCK, routing_metadata

    E = shape[3]
    _, _, ids, _, _ = make_inputs(*shape, torch.float32)
    # also more slots than one block, to cover the three-launch path and its cross-block prefix
    for topk_ids in (ids, torch.randint(0, E, (3 * SLOT_BLOCK + 5, 1), device=DEVICE)):
        got = routing_metadata(topk_ids, E)
        want = torch_impl.routing_metadata(topk_ids, E)
        for name, a, b in zip(("sorted_slots", "slot_pos", "counts"), got, want, strict=True):
            assert a.dtype == torch.int32 and not (a == INT_POISON).any(), name
            assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=[SHAPE_IDS[2], SHAPE_IDS[4]])
def test_every_hidden_layout_gives_the_reference(shape, backend, layout):
    """hidden as a transposed view, every other column, or one row repeated (stride 0): the
    output is contiguous and right, and so are the gradients."""
    T, H = shape[:2]
    hidden, weights, ids, w1, w2 = make_inputs(*shape, torch.float32, seed=2)
    d_y = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
    _check_fp32_against_reference(lambda *a: gk.moe_experts(*a, backend=backend),
                                  (with_layout(hidden, layout), weights, ids, w1, w2), d_y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_in_other_layouts(backend):
    """Expert weights as transposed views of other storage give the same result."""
    hidden, weights, ids, w1, w2 = make_inputs(33, 24, 16, 5, 2, "random", torch.float32)
    want = gk.moe_experts(hidden, weights, ids, w1, w2, backend=backend)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(gk.moe_experts(hidden, weights, ids, w1_t, w2_t, backend=backend), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not runnable here")
def test_every_act_grad_tile_is_as_wide_as_its_partial_buffer_column():
    """The partial d_w buffer has one column per ACT_GRAD_MIN_BLOCK_N columns of I, and each column
    tile writes its own: a narrower tile in the autotune list would write past the buffer."""
    from gavamoe_kernels.moe import grouped_gemm as gg

    tiles = [c.kwargs["BLOCK_N"] for c in [*gg._act_grad.gpu_configs, gg._act_grad.default_config]]
    assert min([*tiles, gg._INTERPRET["BLOCK_N"]]) >= gg.ACT_GRAD_MIN_BLOCK_N


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not runnable here")
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=[SHAPE_IDS[2], SHAPE_IDS[4]])
def test_tma_weight_loads_give_the_reference(shape):
    """The Tensor Memory Accelerator path (GAVAMOE_TMA=1) of the up-, down- and input-gradient
    GEMMs, at decoding (T <= 64) and prefill sizes, forward and backward."""
    from gavamoe_kernels import _triton

    if not _triton.TMA_SUPPORTED:
        pytest.skip("this Triton has no tensor descriptors")
    T, H = shape[:2]
    inputs = make_inputs(*shape, torch.float32, seed=12)
    d_y = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    with _triton.use_tma(True):
        _check_fp32_against_reference(lambda *a: gk.moe_experts(*a, backend="triton"), inputs, d_y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_token_changes_only_its_own_output(backend):
    inputs = list(make_inputs(40, 24, 16, 5, 2, "random", torch.float32))
    clean = gk.moe_experts(*inputs, backend=backend)
    inputs[0] = inputs[0].clone()
    inputs[0][11, 2] = float("nan")
    dirty = gk.moe_experts(*inputs, backend=backend)
    others = torch.arange(40) != 11
    assert torch.equal(dirty[others], clean[others])
    assert torch.isnan(dirty[11]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_runs_are_bitwise_identical(backend):
    inputs = make_inputs(129, 72, 40, 13, 2, "random", torch.float32)
    d_y = torch.randn(129, 72, generator=torch.Generator().manual_seed(3))
    first = _grads(lambda *a: gk.moe_experts(*a, backend=backend), inputs, d_y)
    second = _grads(lambda *a: gk.moe_experts(*a, backend=backend), inputs, d_y)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("only one backend on this machine")
    inputs = make_inputs(129, 72, 40, 13, 2, "random", torch.float32)
    d_y = torch.randn(129, 72, generator=torch.Generator().manual_seed(3))
    results = [_grads(lambda *a, b=b: gk.moe_experts(*a, backend=b), inputs, d_y) for b in BACKENDS]
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_noncontiguous_inputs(backend):
    hidden, weights, ids, w1, w2 = make_inputs(33, 24, 16, 5, 2, "random", torch.float32)
    want = gk.moe_experts(hidden, weights, ids, w1, w2, backend=backend)
    wide = torch.cat([hidden, hidden], dim=1)[:, :24]  # row stride 48
    got = gk.moe_experts(wide, weights.T.contiguous().T, ids.int(), w1, w2, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_forward_and_backward(backend):
    hidden, weights, ids, w1, w2 = (t.clone() for t in make_inputs(0, 32, 16, 4, 2, "random", torch.float32))
    for t in (hidden, weights, w1, w2):
        t.requires_grad_()
    y = gk.moe_experts(hidden, weights, ids, w1, w2, backend=backend)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1)) and hidden.grad.shape == (0, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_custom_ops(backend):
    hidden, weights, ids, w1, w2 = make_inputs(9, 24, 16, 5, 2, "random", torch.float32)
    gate = torch.randn(3, 5, 24, device=DEVICE) / 5
    cids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2], device=DEVICE)
    route_args = (hidden.clone().requires_grad_(), gate.clone().requires_grad_(), cids, 2, True, backend)
    torch.library.opcheck(_route_fwd, route_args)
    expert_args = (hidden.clone().requires_grad_(), weights.clone().requires_grad_(), ids,
                   w1.clone().requires_grad_(), w2.clone().requires_grad_(), True, backend)
    torch.library.opcheck(_experts_fwd, expert_args)


def _bad_expert_cases():
    hidden, weights, ids, w1, w2 = make_inputs(6, 16, 8, 4, 2, "random", torch.float32)
    good = dict(hidden=hidden, topk_weights=weights, topk_ids=ids, w_gate_up=w1, w_down=w2)
    return {
        "hidden-rank": (dict(hidden=hidden[None]), "hidden must have shape (T, H)"),
        "w_gate_up-odd": (dict(w_gate_up=w1[:, :15]), "w_gate_up must have shape (E, 2I, H)"),
        "w_gate_up-H": (dict(w_gate_up=w1[:, :, :8]), "w_gate_up must have shape (E, 2I, H)"),
        "w_down-shape": (dict(w_down=w2[:, :, :4]), "w_down must have shape (E, H, I)"),
        "ids-shape": (dict(topk_ids=ids[:4]), "topk_ids must have shape (T, k)"),
        "k-too-large": (dict(topk_ids=torch.zeros(6, 5, dtype=torch.long, device=DEVICE),
                             topk_weights=torch.ones(6, 5, device=DEVICE)), "k in [1, E=4]"),
        "weights-shape": (dict(topk_weights=weights[:, :1]), "topk_weights must have shape (T, k)"),
        "ids-range": (dict(topk_ids=ids + 4), "topk_ids must hold values in [0, 4)"),
        "ids-float": (dict(topk_ids=ids.float()), "topk_ids must have dtype"),
        "dtype-mix": (dict(w_down=w2.half()), "w_down has dtype"),
        "device-mix": (dict(w_down=w2.to("meta")), "w_down is on meta"),
    }, good


@pytest.mark.parametrize("case", list(_bad_expert_cases()[0]))
def test_bad_expert_input_raises_value_error(case):
    cases, good = _bad_expert_cases()
    change, message = cases[case]
    with pytest.raises(ValueError) as info:
        gk.moe_experts(**{**good, **change})
    assert message in str(info.value)
