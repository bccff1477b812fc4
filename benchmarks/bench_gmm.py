"""Gaussian-mixture responsibilities, forward and forward + backward, against eager torch (the
matmul-form log-sum-exp users write), ``torch.compile`` of it, and scikit-learn's
``predict_proba``; a copy of equal bytes in the same run gives the bandwidth limit. ``fit_gmm``
against scikit-learn's EM fit at equal log-likelihood. Every row is checked against the float64
reference (computed on the device in row chunks) by the STYLE.md rule before it is timed."""

from __future__ import annotations

import functools
import time
import warnings

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import model, peers
from benchmarks.common import (
    DEVICE,
    ON_GPU,
    CheckFailed,
    backward_step,
    check_all,
    generator,
    our_backends,
    record_check,
    run_timed,
)
from gavamoe_kernels.gmm import reference

D = 128
ROWS = [65536, 1 << 20, 1 << 22] if ON_GPU else [65536]
COMPONENTS = [4, 16, 64]
CASES = [(n, k) for n in ROWS for k in COMPONENTS]
FIT_ROWS = 1 << 20 if ON_GPU else 1 << 16
SKLEARN_MAX_ROWS = 1 << 20  # predict_proba beyond this takes minutes on the host; reported as skipped
REFERENCE_ELEMENTS = 1 << 26  # float64 elements of one (rows, K, D) chunk of the reference
IMPLS = ["gavamoe-torch", "gavamoe-triton", "gavamoe-cuda", "eager", "torch.compile", "sklearn"]


def gmm_inputs(N, K, full_size, seed=0, separation=1.0):
    """z [N, D] around K components drawn on the device, log_pi normalised, mu, logvar."""
    N, d = (N, D) if full_size else (203, 20)
    K = K if full_size else min(K, 7)
    g = generator(seed)
    mu = torch.randn(K, d, device=DEVICE, generator=g) * separation
    z = mu[torch.randint(0, K, (N,), device=DEVICE, generator=g)] + torch.randn(N, d, device=DEVICE, generator=g)
    log_pi = torch.log_softmax(torch.randn(K, device=DEVICE, generator=g), 0)
    logvar = torch.randn(K, d, device=DEVICE, generator=g) * 0.2
    return [z, log_pi, mu, logvar]


@functools.cache
def _compiled() -> peers.Compiled:
    return peers.Compiled(peers.eager_gmm_log_responsibilities)


def _function(impl, full_size):
    if impl.startswith("gavamoe-"):
        backend = impl.removeprefix("gavamoe-")
        if backend not in our_backends(full_size):
            pytest.skip(f"{impl} is not timed on this machine")
        return "ours", lambda *a: gk.gmm_log_responsibilities(*a, backend=backend)
    if impl == "eager":
        return "peer", peers.eager_gmm_log_responsibilities
    if impl == "torch.compile":
        return "peer", _compiled()
    raise AssertionError(impl)


def _reference(inputs, g=None, dtype=torch.float64):
    """log_gamma of the reference in ``dtype``, and with ``g`` the gradients of sum(log_gamma * g),
    in row chunks that bound the (rows, K, D) tensor the reference builds."""
    z, log_pi, mu, logvar = (t.detach().to(dtype) for t in inputs)
    rows = max(1, REFERENCE_ELEMENTS // (mu.numel()))
    params = [t.requires_grad_(g is not None) for t in (log_pi, mu, logvar)]
    out, d_z = [], []
    for start in range(0, z.shape[0], rows):
        chunk = z[start:start + rows].requires_grad_(g is not None)
        with torch.set_grad_enabled(g is not None):
            log_gamma = reference.log_responsibilities(chunk, *params)
        if g is not None:
            (log_gamma * g[start:start + rows].to(dtype)).sum().backward()
            d_z.append(chunk.grad)
        out.append(log_gamma.detach())
    if g is None:
        return torch.cat(out)
    return [torch.cat(d_z), *(p.grad for p in params)]


@functools.lru_cache(maxsize=1)
def _case(case, full_size):
    inputs = gmm_inputs(*case, full_size)
    return inputs, _reference(inputs), _reference(inputs, dtype=torch.float32)


def _bytes(z, K):
    return float(z.numel() * z.element_size() + z.shape[0] * K * 4)  # read z, write (N, K) fp32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_responsibilities_forward(benchmark, full_size, rates, case, impl):
    inputs, want, base = _case(case, full_size)
    z, K = inputs[0], inputs[1].shape[0]
    name = f"gmm forward N={z.shape[0]} K={K}"
    if impl == "sklearn":
        if ON_GPU and z.shape[0] > SKLEARN_MAX_ROWS:
            pytest.skip(f"scikit-learn predict_proba on the host: not run beyond N={SKLEARN_MAX_ROWS}")
        gm = peers.sklearn_mixture(*inputs[1:])
        z_np = z.double().cpu().numpy()
        got = torch.from_numpy(gm.predict_proba(z_np)).to(DEVICE)
        record_check(benchmark, "peer", lambda: check_all(("gamma",), (got,), (torch.exp(want),), (torch.exp(base),),
                                                          torch.float32))
        run_timed(benchmark, name, impl, "peer", lambda: gm.predict_proba(z_np), bytes_moved=_bytes(z, K), rounds=3)
        return
    role, fn = _function(impl, full_size)
    compiles_before = peers.compiles_so_far(fn)
    with torch.inference_mode():
        record_check(benchmark, role, lambda: check_all(("gamma",), (torch.exp(fn(*inputs)),), (torch.exp(want),),
                                                        (torch.exp(base),), torch.float32))
        info = peers.compile_info(fn, compiles_before)
        prediction = (model.predict(model.gmm_forward_kernels(z.shape[0], z.shape[1], K, z.element_size()), rates)
                      if impl in ("gavamoe-triton", "gavamoe-cuda") else None)
        run_timed(benchmark, name, impl, role, lambda: fn(*inputs), bytes_moved=_bytes(z, K),
                  flops=3.0 * z.numel() * K, prediction=prediction, **info)


@functools.lru_cache(maxsize=1)
def _gradients(case, full_size):
    inputs = gmm_inputs(*case, full_size)
    g = torch.randn(inputs[0].shape[0], inputs[1].shape[0], device=DEVICE, generator=generator(2))
    return inputs, g, _reference(inputs, g), _reference(inputs, g, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS[:-1])
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_responsibilities_forward_backward(benchmark, full_size, rates, case, impl):
    role, fn = _function(impl, full_size)
    inputs, g, want, base = _gradients(case, full_size)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    z, K = leaves[0], leaves[1].shape[0]
    compiles_before = peers.compiles_so_far(fn)
    step = functools.partial(backward_step(fn, leaves, g), *leaves)  # the gradients of sum(log_gamma * g)
    record_check(benchmark, role, lambda: check_all(("d z", "d log_pi", "d mu", "d logvar"), step(), want, base,
                                                    torch.float32))
    info = peers.compile_info(fn, compiles_before)
    N, d = z.shape
    prediction = (model.predict(model.gmm_forward_kernels(N, d, K, z.element_size())
                                + model.gmm_backward_kernels(N, d, K, z.element_size()), rates)
                  if impl == "gavamoe-triton" else None)
    # about 3x the forward's bytes: z read twice more and d z written; (N, K) read back twice
    run_timed(benchmark, f"gmm forward+backward N={N} K={K}", impl, role, step, bytes_moved=3 * _bytes(z, K),
              prediction=prediction, **info)


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}" for n, k in CASES])
def test_copy_bandwidth(benchmark, full_size, case, direction):
    """The limit of the GMM cases: a device copy whose read + write equals the op's bytes."""
    N, K = (case[0], case[1]) if full_size else (203, min(case[1], 7))
    d = D if full_size else 20
    moved = (N * d * 4 + N * K * 4) * (1 if direction == "forward" else 3)
    src = torch.empty(moved // 8, device=DEVICE)
    dst = torch.empty_like(src)
    run_timed(benchmark, f"gmm {direction} N={N} K={K}", "copy", "limit", lambda: dst.copy_(src),
              bytes_moved=2.0 * src.numel() * 4)


@functools.lru_cache(maxsize=1)
def _fit_case(full_size):
    """The fit's data, and (mean log-likelihood, seconds) of one scikit-learn fit of it: 20
    iterations from k-means++, as ours runs."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z = gmm_inputs(FIT_ROWS, 16, full_size, seed=3, separation=4.0)[0].float()
    K = 16 if full_size else 7
    z_np = z.double().cpu().numpy()
    sk = GaussianMixture(K, covariance_type="diag", max_iter=20, tol=0.0, random_state=0, init_params="k-means++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        sk.fit(z_np)
        seconds = time.perf_counter() - start
    return z, K, float(sk.score(z_np)), seconds


@pytest.mark.parametrize("impl", ["gavamoe", "sklearn"])
def test_fit(benchmark, full_size, impl):
    """EM fit, 20 iterations, diagonal covariances; ours must reach scikit-learn's mean
    log-likelihood per sample within 1% before either is timed. The clusters are well separated
    (component means at 4x the noise's scale) so that both seedings find every cluster and the
    check compares the EM, not the luck of a seeding. scikit-learn fits once: that fit is both
    the check's reference and its timing."""
    z, K, sk_likelihood, sk_seconds = _fit_case(full_size)
    case = f"fit_gmm N={z.shape[0]} D={z.shape[1]} K={K} 20 iterations"
    if impl == "sklearn":
        benchmark.extra_info.update(checked=True, check=f"log-likelihood {sk_likelihood:.4f} (this case's reference)")
        run_timed(benchmark, case, impl, "peer", None, measured_seconds=[sk_seconds])
        return
    ours = gk.fit_gmm(z, K, max_iter=20, tol=0.0, seed=0)
    record_check(benchmark, "ours", lambda: _check_fit(ours.lower_bound, sk_likelihood))
    run_timed(benchmark, case, impl, "ours", lambda: gk.fit_gmm(z, K, max_iter=20, tol=0.0, seed=0), rounds=3)


def _check_fit(ours: float, sklearn: float) -> str:
    summary = f"log-likelihood {ours:.4f} against scikit-learn's {sklearn:.4f}"
    if not abs(ours - sklearn) <= 0.01 * abs(sklearn):
        raise CheckFailed(summary + " (more than 1% apart)")
    return summary
