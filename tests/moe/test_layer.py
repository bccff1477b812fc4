"""ClusterGatedMoE: id layouts, from_dense, aux loss, dtype casting, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gavamoe_kernels as gk
from gavamoe_kernels.moe import reference as ref
from gavamoe_kernels.moe.layer import load_balancing_loss
from tests.helpers import BACKENDS, DEVICE


def make_layer(backend=None, **kw):
    torch.manual_seed(0)
    args = dict(hidden_size=24, intermediate_size=12, num_experts=5, num_clusters=3, top_k=2)
    return gk.ClusterGatedMoE(**{**args, **kw}, device=DEVICE, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_ids_equal_per_token_ids(backend):
    moe = make_layer(backend)
    x = torch.randn(3, 6, 24, device=DEVICE)
    per_seq = torch.tensor([2, 0, 1], device=DEVICE)
    y_seq = moe(x, per_seq)
    y_tok = moe(x, per_seq[:, None].expand(3, 6))
    assert y_seq.shape == x.shape
    torch.testing.assert_close(y_seq, y_tok, atol=0, rtol=0)
    # and both equal the functional reference on flattened tokens
    want = ref.cluster_gated_moe(x.reshape(-1, 24).double(), per_seq.repeat_interleave(6),
                                 moe.gate_weight.double(), moe.w_gate_up.double(), moe.w_down.double(), 2)
    torch.testing.assert_close(y_seq.reshape(-1, 24).double(), want, atol=1e-5, rtol=1e-4)


def test_cluster_ids_actually_select_the_gate():
    moe = make_layer()
    x = torch.randn(2, 5, 24, device=DEVICE)
    a = moe(x, torch.tensor([0, 0], device=DEVICE))
    b = moe(x, torch.tensor([1, 1], device=DEVICE))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("ids_shape", [(2,), (5, 3), (15,), ()], ids=str)
def test_wrong_cluster_id_shape_raises(ids_shape):
    moe = make_layer()
    with pytest.raises(ValueError, match="cluster_ids must have shape"):
        moe(torch.randn(3, 5, 24, device=DEVICE), torch.zeros(ids_shape, dtype=torch.long, device=DEVICE))


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match="top_k must be in"):
        make_layer(top_k=6)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        make_layer(num_experts=0)
    with pytest.raises(ValueError, match="normalize must be a bool, got 1"):
        make_layer(normalize=1)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(\.\.\., 24\)"):
        make_layer()(torch.randn(4, 23, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="cluster_ids must be an int32/int64 tensor"):
        make_layer()(torch.randn(4, 24, device=DEVICE), [0, 1, 2, 0])
    ids = torch.zeros(4, dtype=torch.long, device=DEVICE)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(ValueError, match=r"hidden must have dtype in \(float32, bfloat16, float16\)"):
            make_layer()(torch.zeros(4, 24, dtype=dtype, device=DEVICE), ids)
    with pytest.raises(ValueError, match="gate_weight is on meta"):
        make_layer().to("meta")(torch.randn(4, 24, device=DEVICE), ids)
    with pytest.raises(ValueError, match="cluster_ids is on meta"):
        make_layer()(torch.randn(4, 24, device=DEVICE), ids.to("meta"))


class DenseSwiGLU(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj, self.act_fn = nn.Linear(i, h, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_dense_experts_sum_to_the_dense_mlp(backend):
    torch.manual_seed(1)
    dense = DenseSwiGLU(24, 30).to(DEVICE)
    moe = gk.ClusterGatedMoE.from_dense(dense, num_experts=5, num_clusters=2, top_k=2)
    assert moe.w_gate_up.shape == (5, 12, 24) and moe.w_down.shape == (5, 24, 6)
    x = torch.randn(9, 24, device=DEVICE)
    every_expert = torch.arange(5, device=DEVICE).expand(9, 5)
    y = gk.moe_experts(x, torch.ones(9, 5, device=DEVICE), every_expert, moe.w_gate_up, moe.w_down, backend=backend)
    torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)


def test_from_dense_rejects_what_it_cannot_split():
    with pytest.raises(ValueError, match="must divide the dense intermediate size 30"):
        gk.ClusterGatedMoE.from_dense(DenseSwiGLU(24, 30), num_experts=4, num_clusters=2)
    gelu = DenseSwiGLU(24, 30)
    gelu.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="SiLU-gated"):
        gk.ClusterGatedMoE.from_dense(gelu, num_experts=5, num_clusters=2)
    with pytest.raises(ValueError, match="needs a SwiGLU MLP"):
        gk.ClusterGatedMoE.from_dense(nn.Linear(4, 4), num_experts=2, num_clusters=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aux_loss_matches_formula_and_trains_the_gate(backend):
    moe = make_layer(backend)
    x = torch.randn(40, 24, device=DEVICE)
    cids = torch.randint(0, 3, (40,), device=DEVICE)
    moe(x, cids)
    _, ids, logits = ref.route(x.double(), moe.gate_weight.double(), cids, 2)
    want = ref.load_balancing_loss(logits, ids, 5)
    assert moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(moe.aux_loss, want.float().to(moe.aux_loss.device), atol=1e-5, rtol=1e-5)
    moe.aux_loss.backward()
    assert moe.gate_weight.grad is not None and moe.gate_weight.grad.abs().sum() > 0
    assert gk.collect_aux_loss(nn.Sequential(moe)) is moe.aux_loss or torch.equal(
        gk.collect_aux_loss(nn.Sequential(moe)), moe.aux_loss)


def test_aux_loss_is_one_when_perfectly_balanced():
    logits = torch.zeros(8, 4)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(logits, ids, 4).item() == pytest.approx(1.0)
    assert ref.load_balancing_loss(logits, ids, 4).item() == pytest.approx(1.0)


def test_aux_loss_only_where_it_is_used():
    """Computed in training mode with gradients on; None in eval mode and under no_grad (generation)."""
    moe = make_layer()
    x = torch.randn(2, 5, 24, device=DEVICE)
    ids = torch.tensor([0, 2], device=DEVICE)
    moe(x, ids)
    assert moe.aux_loss is not None
    with torch.no_grad():
        moe(x, ids)
    assert moe.aux_loss is None
    moe.eval()
    moe(x, ids)
    assert moe.aux_loss is None and gk.collect_aux_loss(nn.Sequential(moe)) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuted_input_gives_the_reference(backend):
    """A (S, B, H) -> (B, S, H) permuted view goes in as it is; the output has the input's shape."""
    moe = make_layer(backend)
    x = torch.randn(6, 3, 24, device=DEVICE).permute(1, 0, 2)  # (B=3, S=6, H) with strides of (S, B, H)
    per_seq = torch.tensor([2, 0, 1], device=DEVICE)
    y = moe(x, per_seq)
    want = ref.cluster_gated_moe(x.reshape(-1, 24).double(), per_seq.repeat_interleave(6),
                                 moe.gate_weight.double(), moe.w_gate_up.double(), moe.w_down.double(), 2)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 24).double(), want, atol=1e-5, rtol=1e-4)


def test_cluster_ids_are_checked_once_per_tensor(monkeypatch):
    """The range check reads the ids once per tensor: a model's layers and decoding steps share
    one ids tensor. An in-place change makes it check again; GAVAMOE_ID_CHECK=off skips it."""
    from gavamoe_kernels import _checks

    monkeypatch.setenv("GAVAMOE_ID_CHECK", "sync")  # the host read, on any device
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    moe = make_layer()
    x = torch.randn(2, 5, 24, device=DEVICE)
    ids = torch.tensor([0, 2], device=DEVICE)
    for _ in range(3):
        moe(x, ids)
    assert len(reads) == 1
    ids[1] = 5  # out of range, in place
    with pytest.raises(ValueError, match=r"cluster_ids must hold values in \[0, 3\)"):
        moe(x, ids)
    monkeypatch.setenv("GAVAMOE_ID_CHECK", "off")
    fresh = torch.tensor([0, 1], device=DEVICE)
    moe(x, fresh)
    assert len(reads) == 2 and id(fresh) not in _checks._checked
    monkeypatch.setenv("GAVAMOE_ID_CHECK", "loud")
    with pytest.raises(ValueError, match="GAVAMOE_ID_CHECK must be one of"):
        moe(x, fresh)


def test_parameters_are_cast_to_the_input_dtype():
    moe = make_layer()
    x = torch.randn(2, 4, 24, device=DEVICE)
    ids = torch.tensor([0, 2], device=DEVICE)
    y16 = moe(x.half(), ids)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), moe(x, ids), atol=5e-3, rtol=5e-3)


def test_autocast_computes_in_its_dtype_with_fp32_master_weights():
    """fp32 weights and input under bf16 autocast: the call is the bf16 call (as nn.Linear's is),
    and the gradients reach the fp32 weights in fp32."""
    moe = make_layer()
    x = torch.randn(2, 5, 24, device=DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = moe(x, ids)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, moe(x.bfloat16(), ids), atol=0, rtol=0)
    y.float().square().sum().backward()
    for p in (moe.gate_weight, moe.w_gate_up, moe.w_down):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    moe = make_layer(backend)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, 2], device=DEVICE)
    y = moe(x, ids)
    y.square().sum().backward()
    eager = (y.detach(), x.grad.clone(), moe.w_down.grad.clone())
    x.grad = None
    moe.zero_grad()
    compiled = torch.compile(moe, fullgraph=True)
    y2 = compiled(x, ids)
    y2.square().sum().backward()
    torch.testing.assert_close(y2.detach(), eager[0])
    torch.testing.assert_close(x.grad, eager[1])
    torch.testing.assert_close(moe.w_down.grad, eager[2])


def test_backend_selection():
    x = torch.randn(4, 24)
    moe = make_layer()
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.route(x, moe.gate_weight.cpu(), ids, backend="fast")
    with pytest.raises(gk.BackendUnavailableError, match="cuda"):
        gk.route(x, moe.gate_weight.cpu(), ids, backend="cuda")
    with gk.use_backend("cuda"), pytest.raises(gk.BackendUnavailableError):
        gk.route(x, moe.gate_weight.cpu(), ids)


def test_backend_environment_variable(monkeypatch):
    from gavamoe_kernels._backend import requested_backend, resolve_backend

    monkeypatch.setenv("GAVAMOE_BACKEND", "torch")
    assert requested_backend() == "torch"
    with gk.use_backend("auto"):
        assert requested_backend() == "auto"
        assert requested_backend("triton") == "triton"
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("GAVAMOE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GAVAMOE_BACKEND must be one of"):
        requested_backend()
    monkeypatch.delenv("GAVAMOE_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE.type == "cpu":
        with pytest.raises(gk.BackendUnavailableError, match="TRITON_INTERPRET"):
            resolve_backend(torch.device("cpu"), "triton")


@pytest.mark.skipif("triton" not in BACKENDS or DEVICE.type != "cpu", reason="interpreter check, CPU only")
def test_interpreter_set_too_late_is_a_clear_error(monkeypatch):
    from gavamoe_kernels import _triton

    monkeypatch.setattr(_triton, "INTERPRET", False)  # as if the kernels had loaded before TRITON_INTERPRET=1
    with pytest.raises(gk.BackendUnavailableError, match="set it before the first call"):
        gk.route(torch.randn(3, 8), torch.randn(2, 4, 8), torch.zeros(3, dtype=torch.long), backend="triton")
