"""Gaussian-mixture responsibilities, forward and forward + backward, against eager torch
(the matmul-form log-sum-exp users write), ``torch.compile`` of it, and scikit-learn's
``predict_proba`` (CPU); a copy of equal bytes in the same run gives the bandwidth limit.
``fit_gmm`` against scikit-learn's EM fit. Each output is checked against ours before timing."""

from __future__ import annotations

import warnings

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import peers
from benchmarks.common import DEVICE, ON_GPU, our_backends, run_timed

D = 128
ROWS = [65536, 1 << 20, 1 << 22] if ON_GPU else [65536]
COMPONENTS = [4, 16, 64]
CASES = [(n, k) for n in ROWS for k in COMPONENTS]
FIT_ROWS = 1 << 20 if ON_GPU else 1 << 16
SKLEARN_MAX_ROWS = 1 << 20  # predict_proba beyond this takes minutes on the host; reported as skipped
IMPLS = ["gavamoe-torch", "gavamoe-triton", "gavamoe-cuda", "eager", "torch.compile", "sklearn"]


def gmm_inputs(N, K, full_size, seed=0, separation=1.0):
    N, d = (N, D) if full_size else (203, 20)
    K = K if full_size else min(K, 7)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g) * separation
    z = mu[torch.randint(0, K, (N,), generator=g)] + torch.randn(N, d, generator=g)
    log_pi = torch.log_softmax(torch.randn(K, generator=g), 0)
    logvar = torch.randn(K, d, generator=g) * 0.2
    return [t.to(DEVICE) for t in (z, log_pi, mu, logvar)]


def _function(impl, full_size):
    if impl.startswith("gavamoe-"):
        backend = impl.removeprefix("gavamoe-")
        if backend not in our_backends(full_size):
            pytest.skip(f"{impl} is not timed on this machine")
        return lambda *a: gk.gmm_log_responsibilities(*a, backend=backend)
    if impl == "eager":
        return peers.eager_gmm_log_responsibilities
    if impl == "torch.compile":
        if not full_size:
            pytest.skip("torch.compile peer: runs with --benchmark only (its compile time would dominate make test)")
        return torch.compile(peers.eager_gmm_log_responsibilities, dynamic=False)
    raise AssertionError(impl)


def _bytes(z, K):
    return float(z.numel() * z.element_size() + z.shape[0] * K * 4)  # read z, write (N, K) fp32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_responsibilities_forward(benchmark, full_size, case, impl):
    inputs = gmm_inputs(*case, full_size)
    z, K = inputs[0], inputs[1].shape[0]
    want = gk.gmm_log_responsibilities(*inputs, backend="torch")  # float64 inside: the most accurate
    if impl == "sklearn":
        if ON_GPU and z.shape[0] > SKLEARN_MAX_ROWS:
            pytest.skip(f"scikit-learn predict_proba on the host: not run beyond N={SKLEARN_MAX_ROWS}")
        gm = peers.sklearn_mixture(*inputs[1:])
        z_np = z.double().cpu().numpy()
        got = torch.from_numpy(gm.predict_proba(z_np))
        torch.testing.assert_close(got, torch.exp(want.double()).cpu(), atol=1e-4, rtol=0)
        run_timed(benchmark, f"gmm forward N={z.shape[0]} K={K}", impl, "peer", gm.predict_proba, z_np,
                  bytes_moved=_bytes(z, K))
        return
    fn = _function(impl, full_size)
    torch.testing.assert_close(torch.exp(fn(*inputs)), torch.exp(want), atol=1e-4, rtol=0)
    with torch.inference_mode():
        run_timed(benchmark, f"gmm forward N={z.shape[0]} K={K}", impl,
                  "ours" if impl.startswith("gavamoe") else "peer", fn, *inputs, bytes_moved=_bytes(z, K))


@pytest.mark.parametrize("impl", IMPLS[:-1])
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_responsibilities_forward_backward(benchmark, full_size, case, impl):
    inputs = [t.requires_grad_() for t in gmm_inputs(*case, full_size)]
    z, K = inputs[0], inputs[1].shape[0]
    g = torch.randn(z.shape[0], K, device=DEVICE)

    def step(fn):
        for t in inputs:
            t.grad = None
        (fn(*inputs) * g).sum().backward()
        return [t.grad for t in inputs]

    want = [t.clone() for t in step(lambda *a: gk.gmm_log_responsibilities(*a, backend="torch"))]
    fn = _function(impl, full_size)
    for name, got, ref in zip(("d z", "d log_pi", "d mu", "d logvar"), step(fn), want, strict=True):
        scale = ref.abs().max().item() or 1.0
        torch.testing.assert_close(got / scale, ref / scale, atol=1e-4, rtol=0, msg=name)
    # about 3x the forward's bytes: z read twice and d z written; (N, K) written once and read twice
    run_timed(benchmark, f"gmm forward+backward N={z.shape[0]} K={K}", impl,
              "ours" if impl.startswith("gavamoe") else "peer", step, fn, bytes_moved=3 * _bytes(z, K))


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_copy_bandwidth(benchmark, full_size, case, direction):
    """The limit of the GMM cases: a device copy whose read + write equals the op's bytes."""
    z, log_pi = gmm_inputs(*case, full_size)[:2]
    K = log_pi.shape[0]
    moved = _bytes(z, K) * (1 if direction == "forward" else 3)
    src = torch.empty(int(moved) // 8, device=DEVICE)
    dst = torch.empty_like(src)
    run_timed(benchmark, f"gmm {direction} N={z.shape[0]} K={K}", "copy", "limit", dst.copy_, src,
              bytes_moved=2.0 * src.numel() * 4)


@pytest.mark.parametrize("impl", ["gavamoe", "sklearn"])
def test_fit(benchmark, full_size, impl):
    """EM fit, 20 iterations, diagonal covariances; ours must reach scikit-learn's mean
    log-likelihood per sample (within 0.05 nats) before either is timed. The clusters are well
    separated (component means drawn at 4x the noise's scale) so that both seedings find every cluster and
    the check compares the EM, not the luck of a seeding."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z = gmm_inputs(FIT_ROWS, 16, full_size, seed=3, separation=4.0)[0].float()
    K = 16 if full_size else 7
    ours = gk.fit_gmm(z, K, max_iter=20, tol=0.0, seed=0)
    z_np = z.double().cpu().numpy()
    sk = GaussianMixture(K, covariance_type="diag", max_iter=20, tol=0.0, random_state=0, init_params="k-means++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(z_np)
        assert ours.lower_bound >= sk.lower_bound_ - 0.05, (ours.lower_bound, sk.lower_bound_)
        fn = (lambda: gk.fit_gmm(z, K, max_iter=20, tol=0.0, seed=0)) if impl == "gavamoe" else (lambda: sk.fit(z_np))
        run_timed(benchmark, f"fit_gmm N={z.shape[0]} D={z.shape[1]} K={K} 20 iterations", impl,
                  "ours" if impl == "gavamoe" else "peer", fn)
