"""FAME's last layer: the router path (gk.route, cluster = head, batched SDPA) against the
plain-torch layer in float64, in value and every gradient; the model's scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gavamoe.fame import reference
from gavamoe.fame.model import FameLayer, SeqRec, SeqRecConfig, attention_mask
from gavamoe_kernels.testing import assert_close_to_reference

CASES = [  # (B, S, D, H, N, top_k): odd sizes, one head, one expert, sparse routing
    (3, 7, 12, 3, 4, None),
    (2, 5, 10, 1, 3, None),
    (1, 9, 8, 2, 1, None),
    (4, 6, 16, 4, 5, 2),
]


def _inputs(B, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (B, S), generator=g)
    ids[0, : S // 2] = 0  # a left-padded row
    return torch.randn(B, S, D, generator=g), attention_mask(ids)


@pytest.mark.parametrize(("B", "S", "D", "H", "N", "top_k"), CASES, ids=lambda v: str(v))
def test_router_path_equals_plain_torch_in_value_and_gradient(B, S, D, H, N, top_k):
    torch.manual_seed(B * 100 + N)
    layer = FameLayer(D, H, N, top_k, dropout=0.0)
    x, mask = _inputs(B, S, D, seed=N)
    x.requires_grad_(True)
    out = layer(x, mask)
    want = reference.fame_layer(layer, x, mask, torch.float64)
    base = reference.fame_layer(layer, x, mask, torch.float32)  # plain torch in the layer's dtype
    assert_close_to_reference("r", out, want, base, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    params64 = [p.detach().double().requires_grad_(True) for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    x64 = x.detach().double().requires_grad_(True)
    with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, params64, strict=True))):
        want64 = reference.fame_layer(layer, x64, mask, torch.float64)
    expected = torch.autograd.grad(want64, [x64, *params64], grad.double())
    with torch.nn.utils.stateless._reparametrize_module(
            layer, {n: p.detach().float().requires_grad_(True) for n, p in zip(names, params64, strict=True)}):
        x32 = x.detach().requires_grad_(True)
        base32 = reference.fame_layer(layer, x32, mask, torch.float32)
        baseline = torch.autograd.grad(base32, [x32, *[p for _, p in layer.named_parameters()]], grad)
    for name, g, w, b in zip(["x", *names], got, expected, baseline, strict=True):
        assert_close_to_reference(f"d{name}", g, w, b, atol=1e-5)


def test_dense_routing_weights_sum_to_one_and_sparse_keeps_top_k():
    layer = FameLayer(12, 3, 4, None, dropout=0.0)
    x, mask = _inputs(2, 5, 12, seed=0)
    layer(x, mask)
    w = layer.expert_weights
    assert w.shape == (2, 5, 3, 4) and torch.allclose(w.sum(-1), torch.ones(2, 5, 3)) and (w > 0).all()
    sparse = FameLayer(12, 3, 4, 2, dropout=0.0)
    sparse(x, mask)
    assert ((sparse.expert_weights > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("head_mix", ["logits", "probs"])
def test_model_scores_are_log_probabilities_and_padding_does_not_leak(head_mix):
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig(30, "fame", dim=16, num_heads=2, num_experts=3, head_mix=head_mix, max_len=8,
                                dropout=0.0)).eval()
    ids = torch.tensor([[0, 0, 0, 4, 7, 9, 2, 5], [1, 2, 3, 4, 7, 9, 2, 5]])
    out = model.log_probs(ids)
    assert out.shape == (2, 8, 30) and model.head_weights.shape == (2, 8, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 8))
    # causal: a later item changes later positions only
    other = ids.clone()
    other[1, 6] = 11
    changed = model.log_probs(other)
    torch.testing.assert_close(changed[:, :6], out[:, :6])
    assert not torch.allclose(changed[1, 6:], out[1, 6:])
    # padding is invisible: without position embeddings, the padded row's real positions score as
    # the unpadded sequence does
    with torch.no_grad():
        model.position_embedding.weight.zero_()
    torch.testing.assert_close(model.log_probs(ids[:1])[0, 3:], model.log_probs(ids[:1, 3:])[0])
    sasrec = SeqRec(SeqRecConfig(30, "sasrec", dim=16, num_heads=2, max_len=8, dropout=0.0)).eval()
    assert sasrec.log_probs(ids, last_only=True).shape == (2, 30)


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("model_name, head_mix", [("fame", "logits"), ("fame", "probs"), ("sasrec", "logits")])
def test_scoring_only_the_target_positions_equals_scoring_all_then_selecting(model_name, head_mix, groups,
                                                                             monkeypatch):
    """Training scores only the positions with a target (``where``) and evaluation only the last
    one, each running rows grouped by their padding without it (``hidden_at``): the same scores,
    gradients, head gate and expert weights as the full computation at those positions."""
    monkeypatch.setattr(SeqRec, "GROUPS", groups)
    torch.manual_seed(1)
    model = SeqRec(SeqRecConfig(23, model_name, dim=12, num_heads=3, num_experts=2, head_mix=head_mix, max_len=9,
                                dropout=0.0))  # float32: gk.route takes no float64
    ids = torch.tensor([[0, 0, 0, 0, 0, 0, 4, 7, 9], [0, 1, 2, 3, 4, 7, 9, 2, 6], [0, 0, 0, 0, 5, 5, 1, 22, 3],
                        [0, 0, 0, 0, 0, 0, 0, 0, 8]])
    where = ids != 0
    where[1, 3] = False
    targets = torch.randint(1, 24, (int(where.sum()),))
    full = model.log_probs(ids)
    heads, experts = model.head_weights, model.expert_weights
    picked = model.log_probs(ids, where=where)
    torch.testing.assert_close(picked, full[where], rtol=1e-5, atol=1e-6)
    if model_name == "fame":
        torch.testing.assert_close(model.head_weights, heads[where], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.expert_weights, experts[where], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(F.nll_loss(out, targets - 1), list(model.parameters()), allow_unused=True)
             for out in (full[where], picked)]
    for name, (a, b) in zip([n for n, _ in model.named_parameters()], zip(*grads, strict=True), strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(ids, last_only=True), full[:, -1], rtol=1e-5, atol=1e-6)
