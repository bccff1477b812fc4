"""Gaussian-mixture responsibilities and fit_gmm against float64 and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels.gmm import reference as ref
from gavamoe_kernels.gmm.ops import _gmm_fwd
from gavamoe_kernels.testing import assert_close_to_reference, max_error
from tests.gmm.cases import SHAPE_IDS, SHAPES
from tests.gmm.cases import gmm_inputs as make_inputs
from tests.helpers import ATOL, BACKENDS, DEVICE, DTYPES, LAYOUTS, expect_refusal, with_layout


def _grads(fn, inputs, g):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if out.requires_grad:  # no graph at N = 0 in the reference
        (out * g.to(out)).sum().backward()
    return out.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _scaled_atol(dtype, reference):
    return ATOL[dtype] * max(1.0, reference.abs().max().item() if reference.numel() else 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_log_responsibilities_and_gradients(shape, backend, dtype):
    N, D, K = shape
    inputs = make_inputs(N, D, K, dtype, seed=N + K)
    g = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    with expect_refusal(backend, dtype) as refused:
        out, grads = _grads(lambda *a: gk.gmm_log_responsibilities(*a, backend=backend), inputs, g)
    if refused:
        return
    assert out.dtype == torch.float32 and out.shape == (N, K)
    as64 = [t.detach().cpu().double() for t in inputs]
    out64, grads64 = _grads(ref.log_responsibilities, as64, g)
    # plain torch in the kernel's arithmetic (fp32) on the same rounded inputs
    out_base, grads_base = _grads(ref.log_responsibilities, [t.detach().cpu().float() for t in inputs], g)
    assert_close_to_reference("log_gamma", out.cpu(), out64, out_base, _scaled_atol(torch.float32, out64))
    for name, got, want, base, inp in zip(("d z", "d log_pi", "d mu", "d logvar"), grads, grads64, grads_base,
                                          inputs, strict=True):
        assert got.dtype == inp.dtype, name
        tol = _scaled_atol(dtype if name == "d z" else torch.float32, want)
        assert_close_to_reference(name, got.cpu().float(), want, base, tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_z_layout_gives_the_reference(backend, layout):
    z, log_pi, mu, logvar = make_inputs(37, 20, 5, seed=3)
    z = with_layout(z, layout)
    g = torch.randn(37, 5, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(lambda *a: gk.gmm_log_responsibilities(*a, backend=backend), (z, log_pi, mu, logvar), g)
    out64, grads64 = _grads(ref.log_responsibilities, [t.detach().cpu().double() for t in (z, log_pi, mu, logvar)], g)
    torch.testing.assert_close(out.cpu().double(), out64, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, grads64, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)


def _edge_case(case: str, K: int):
    """Inputs where fp32 arithmetic meets its limits (issue: every backend gives the same answer)."""
    z, log_pi, mu, logvar = make_inputs(6, 8, K, seed=5)
    logvar = torch.randn(K, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE) * 0.5
    if case == "dead-components":  # whole tiles of components with log_pi = -inf, as fit_gmm makes them
        log_pi = log_pi.clone()
        log_pi[:K - 3] = float("-inf")
    elif case == "tiny-variance":  # 1/var overflows fp32
        logvar[3] = -100.0
    elif case == "z-at-a-tiny-variance-mean":  # 0 * (1/var = inf) must not be NaN
        logvar[3] = -100.0
        z = z.clone()
        z[2] = mu[3]
    elif case == "z-far-away":  # every Mahalanobis sum overflows fp32; the widest component wins
        z = z.clone()
        z[1] = 1e20
    elif case == "every-log_pi-minus-inf":
        log_pi = torch.full_like(log_pi, float("-inf"))
    return z, log_pi, mu, logvar


EDGE_CASES = ["dead-components", "tiny-variance", "z-at-a-tiny-variance-mean", "z-far-away", "every-log_pi-minus-inf"]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("K", [20, 70], ids=["one-component-tile", "several-tiles"])
@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_agree_with_float64(backend, case, K):
    """Every backend gives what float64 gives, cast to fp32: dead components get responsibility 0,
    an overflowing row a log-density of -inf and the nearest component's responsibility 1, and
    only every log_pi = -inf (0/0) gives NaN responsibilities (with log-density -inf)."""
    z, log_pi, mu, logvar = _edge_case(case, K)
    log_gamma, log_norm = gk.gmm_log_prob(z, log_pi, mu, logvar, backend=backend)
    log_p64 = ref.component_log_prob(*(t.cpu().double() for t in (z, log_pi, mu, logvar)))
    want_norm = torch.logsumexp(log_p64, -1).float()
    want_gamma = (log_p64 - torch.logsumexp(log_p64, -1, keepdim=True)).float()
    torch.testing.assert_close(log_norm.cpu(), want_norm, atol=1e-4, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(torch.exp(log_gamma).cpu(), torch.exp(want_gamma), atol=1e-5, rtol=0, equal_nan=True)
    if case == "every-log_pi-minus-inf":
        assert torch.isnan(log_gamma).all() and torch.isneginf(log_norm).all()
    else:
        assert not torch.isnan(log_gamma).any()
    if case == "z-far-away":
        assert torch.isneginf(log_norm[1]) and torch.exp(log_gamma[1]).max() == 1.0
        assert torch.exp(log_gamma[1]).argmax() == torch.exp(-logvar).sum(-1).argmin()  # the widest component


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_well_separated_tight_components(backend):
    """Components far from each other with small variances: the parameter gradients' expansion
    about the centre would lose its digits here, so the kernels take the direct form."""
    g = torch.Generator().manual_seed(9)
    mu = torch.randn(5, 16, generator=g) * 10
    z = mu[torch.randint(0, 5, (300,), generator=g)] + 0.1 * torch.randn(300, 16, generator=g)
    inputs = [t.to(DEVICE) for t in (z, torch.log_softmax(torch.randn(5, generator=g), 0), mu,
                                     torch.full((5, 16), -4.0) + 0.2 * torch.randn(5, 16, generator=g))]
    d_out = torch.randn(300, 5, generator=g)
    out, grads = _grads(lambda *a: gk.gmm_log_responsibilities(*a, backend=backend), inputs, d_out)
    out64, grads64 = _grads(ref.log_responsibilities, [t.cpu().double() for t in inputs], d_out)
    base, grads_base = _grads(ref.log_responsibilities, [t.cpu().float() for t in inputs], d_out)
    assert_close_to_reference("log_gamma", out.cpu(), out64, base, _scaled_atol(torch.float32, out64))
    for name, got, want, b in zip(("d z", "d log_pi", "d mu", "d logvar"), grads, grads64, grads_base, strict=True):
        assert_close_to_reference(name, got.cpu(), want, b, _scaled_atol(torch.float32, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_and_match_sklearn_predict_proba(backend):
    mixture = pytest.importorskip("sklearn.mixture")
    z, log_pi, mu, logvar = make_inputs(300, 12, 4)
    gamma = gk.gmm_responsibilities(z, log_pi, mu, logvar, backend=backend)
    torch.testing.assert_close(gamma.sum(-1), torch.ones(300, device=DEVICE), atol=1e-5, rtol=0)
    gm = mixture.GaussianMixture(4, covariance_type="diag")
    gm.weights_ = torch.softmax(log_pi.double(), 0).cpu().numpy()
    gm.means_ = mu.double().cpu().numpy()
    gm.covariances_ = torch.exp(logvar.double()).cpu().numpy()
    gm.precisions_cholesky_ = 1.0 / np.sqrt(gm.covariances_)
    want = gm.predict_proba(z.double().cpu().numpy())
    np.testing.assert_allclose(gamma.double().cpu().numpy(), want, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_d128_responsibilities_do_not_underflow(backend):
    """The VaDE/GaVaMoE reference computes exp(log pi + log N) and normalises: at D = 128 in
    fp32 every term underflows and gamma is 0/0. Ours stays exact and non-uniform."""
    z, log_pi, mu, logvar = make_inputs(64, 128, 6)
    naive = ref.naive_responsibilities(z.cpu(), log_pi.cpu(), mu.cpu(), logvar.cpu())
    assert not torch.isfinite(naive).all() or (naive - 1 / 6).abs().max() < 1e-3  # the bug, as documented
    gamma = gk.gmm_responsibilities(z, log_pi, mu, logvar, backend=backend)
    want = torch.exp(ref.log_responsibilities(*(t.double().cpu() for t in (z, log_pi, mu, logvar))))
    assert torch.isfinite(gamma).all()
    assert gamma.max(-1).values.min() > 0.9  # points near their own component: confident, not uniform
    torch.testing.assert_close(gamma.double().cpu(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_choice_weighs_log_pi_not_pi(backend):
    """The GaVaMoE reference adds pi where it means log pi. Here z is 3 nats likelier under
    component 1, but component 0 is 999 times more probable a priori: log pi decides for 0
    (6.9 > 3), the buggy pi would decide for 1 (0.998 < 3)."""
    D = 4
    mu = torch.tensor([[0.0] * D, [1.0] * D], device=DEVICE)
    logvar = torch.zeros(2, D, device=DEVICE)
    # log N1 - log N0 = 0.5 * (|z - mu0|^2 - |z - mu1|^2) = 0.5 * (2 s D - D) = 3  =>  s = 1.25
    z = torch.full((1, D), 1.25, device=DEVICE)
    pi = torch.tensor([0.999, 0.001], device=DEVICE)
    log_n = ref.component_log_prob(z.double().cpu(), torch.zeros(2, dtype=torch.float64), mu.double().cpu(),
                                   logvar.double().cpu())
    assert (log_n[0, 1] - log_n[0, 0]).item() == pytest.approx(3.0)
    assert (log_n + pi.double().cpu()).argmax(-1).item() == 1  # the bug
    gamma = gk.gmm_responsibilities(z, torch.log(pi), mu, logvar, backend=backend)
    assert gamma.argmax(-1).item() == 0
    assert gamma[0, 0].item() == pytest.approx(1 / (1 + np.exp(3 - np.log(999))), rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_pi_need_not_be_normalised(backend):
    z, log_pi, mu, logvar = make_inputs(20, 7, 3)
    a = gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend=backend)
    b = gk.gmm_log_responsibilities(z, log_pi + 123.0, mu, logvar, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_changes_only_its_own_row(backend):
    z, log_pi, mu, logvar = make_inputs(30, 9, 4)
    clean = gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend=backend)
    z = z.clone()
    z[7, 2] = float("nan")
    dirty = gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend=backend)
    others = torch.arange(30) != 7
    assert torch.equal(dirty[others], clean[others]) and torch.isnan(dirty[7]).all()


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("only one backend on this machine")
    inputs = make_inputs(200, 128, 16)
    g = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    results = [_grads(lambda *a, b=b: gk.gmm_log_responsibilities(*a, backend=b), inputs, g) for b in BACKENDS]
    for out, grads in results[1:]:
        assert max_error(out, results[0][0]) < 1e-3
        for a, b in zip(grads, results[0][1], strict=True):
            assert max_error(a, b) < 1e-3 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z, log_pi, mu, logvar = make_inputs(11, 6, 3)
    args = (*(t.clone().requires_grad_() for t in (z, log_pi, mu, logvar)), backend)
    torch.library.opcheck(_gmm_fwd, args)


def _bad_cases():
    z, log_pi, mu, logvar = make_inputs(5, 4, 3)
    good = dict(z=z, log_pi=log_pi, mu=mu, logvar=logvar)
    return {
        "z-rank": (dict(z=z[None]), "z must have shape (N, D)"),
        "z-int": (dict(z=z.long()), "z must have dtype"),
        "log_pi-rank": (dict(log_pi=log_pi[None]), "log_pi must have shape (K,)"),
        "mu-K": (dict(mu=mu[:2]), "mu must have shape (K, D)"),
        "mu-D": (dict(mu=mu[:, :3]), "mu must have shape (K, D)"),
        "logvar-shape": (dict(logvar=logvar[:, :3]), "logvar must have shape (K, D)"),
        "device": (dict(mu=mu.to("meta")), "mu is on meta"),
    }, good


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_input_raises_value_error(case):
    cases, good = _bad_cases()
    change, message = cases[case]
    with pytest.raises(ValueError) as info:
        gk.gmm_log_responsibilities(**{**good, **change})
    assert message in str(info.value)


def _blobs(n, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    scales = torch.rand(k, d, generator=g) + 0.5
    labels = torch.randint(0, k, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g) * scales[labels]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_gmm_reaches_sklearn_likelihood(backend):
    mixture = pytest.importorskip("sklearn.mixture")
    z = _blobs(3000 if backend == "torch" else 600, 16, 4)
    params = gk.fit_gmm(z.to(DEVICE), 4, max_iter=100, tol=1e-3, seed=0, backend=backend)
    sk = mixture.GaussianMixture(4, covariance_type="diag", tol=1e-3, random_state=0).fit(z.double().numpy())
    want = sk.score(z.double().numpy())
    assert params.log_pi.shape == (4,) and params.mu.shape == (4, 16) and params.logvar.shape == (4, 16)
    assert abs(params.lower_bound - want) <= 0.01 * abs(want), (params.lower_bound, want)
    # the reported lower bound is the mean log-likelihood of the returned parameters
    log_norm = gk.gmm_log_prob(z.to(DEVICE), torch.log_softmax(params.log_pi, 0), params.mu, params.logvar)[1]
    assert log_norm.mean().item() == pytest.approx(params.lower_bound, abs=1e-3)


def test_fit_gmm_is_seeded_and_checks_input():
    z = _blobs(500, 5, 3)
    rng = torch.get_rng_state()
    a, b = gk.fit_gmm(z, 3, seed=1), gk.fit_gmm(z, 3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator
    assert torch.equal(a.mu, b.mu) and a.lower_bound == b.lower_bound
    with pytest.raises(ValueError, match="at least num_components"):
        gk.fit_gmm(z[:2], 3)
    with pytest.raises(ValueError, match="must be finite"):
        gk.fit_gmm(torch.full((10, 2), float("nan")), 2)
    with pytest.raises(ValueError, match="num_components must be a positive int"):
        gk.fit_gmm(z, 0)
    for tol in (-1.0, float("nan"), "1e-3"):  # a NaN tolerance never stops, a negative one neither
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            gk.fit_gmm(z, 3, tol=tol)
    for seed in (1.5, "0", -1, True):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            gk.fit_gmm(z, 3, seed=seed)


def test_fit_gmm_without_variance_floor_refuses_instead_of_nan():
    z = _blobs(300, 4, 3)
    z[:, 2] = 1.5  # a dimension with zero variance
    with pytest.raises(ValueError, match=r"zero variance in dimension\(s\) \[2\]"):
        gk.fit_gmm(z, 3, reg_covar=0.0)
    for value in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"reg_covar must be a finite number >= 0"):
            gk.fit_gmm(z, 3, reg_covar=value)
    params = gk.fit_gmm(z, 3)  # the default floor keeps it finite
    assert all(torch.isfinite(t).all() for t in (params.log_pi, params.mu, params.logvar))
    collapsing = _blobs(300, 4, 3)
    collapsing[:80] = 3.0  # 80 identical points: a component takes them with variance 0
    with pytest.raises(ValueError, match="non-finite parameters"):
        gk.fit_gmm(collapsing, 3, reg_covar=0.0)
