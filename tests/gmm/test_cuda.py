"""The cuda backend's Gaussian-mixture forward (csrc/gmm.cu) against torch and Triton.

GPU only: marked ``gpu`` (skipped without CUDA) and skipped when the extension is not built.
test_gmm.py's grid also runs the cuda backend through BACKENDS against float64; these tests
add backend-to-backend agreement on every tile configuration of the kernel, NaN and -inf
handling, the extension's own input errors, and CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels._backend import cuda_extension_built
from tests.gmm.cases import SHAPES as GRID_SHAPES
from tests.gmm.cases import gmm_inputs
from tests.helpers import DEVICE, DTYPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not cuda_extension_built(),
                       reason="the CUDA extension is not built (pip install --no-build-isolation .)"),
]

# the shared grid (tests/gmm/cases.py), every component-tile configuration (K <= 4, 8, 16, 32, 64, then several
# 64-wide tiles), the stated limits D = 1024 and K = 256, and more rows than one block
SHAPES = [*GRID_SHAPES, (1000, 128, 4), (513, 128, 8), (777, 128, 16), (300, 64, 32), (300, 33, 64),
          (300, 128, 65), (257, 1024, 256), (70000, 128, 16)]
SHAPE_IDS = [f"N{n}-D{d}-K{k}" for n, d, k in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_log_responsibilities_agree_with_torch_and_triton(shape, dtype):
    N, D, K = shape
    z, log_pi, mu, logvar = gmm_inputs(N, D, K, dtype, seed=K)
    log_gamma, log_norm = gk.gmm_log_prob(z, log_pi, mu, logvar, backend="cuda")
    for other in ("torch", "triton"):
        want_gamma, want_norm = gk.gmm_log_prob(z, log_pi, mu, logvar, backend=other)
        scale = max(1.0, want_norm.abs().max().item() if N else 1.0)
        torch.testing.assert_close(log_gamma, want_gamma, atol=2e-5 * scale, rtol=1e-5, msg=other)
        torch.testing.assert_close(log_norm, want_norm, atol=2e-5 * scale, rtol=1e-5, msg=other)


def test_cuda_gradients_equal_triton():
    """The cuda backend's backward is the Triton kernel, fed the CUDA forward."""
    inputs = gmm_inputs(300, 128, 16, seed=2)
    g = torch.randn(300, 16, device=DEVICE)
    grads = {}
    for backend in ("cuda", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (gk.gmm_log_responsibilities(*leaves, backend=backend) * g).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["cuda"], grads["triton"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [3, 70])  # one component tile and several
def test_nan_row_and_impossible_component(K):
    z, log_pi, mu, logvar = gmm_inputs(130, 128, K, seed=1)
    z[17, 5] = float("nan")
    log_pi[1] = float("-inf")
    got = gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend="cuda")
    want = gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend="torch")
    assert torch.isnan(got[17]).all()
    rest = torch.ones(130, dtype=torch.bool, device=DEVICE)
    rest[17] = False
    assert torch.isneginf(got[rest, 1]).all()
    torch.testing.assert_close(got[rest], want[rest], atol=1e-4, rtol=1e-5)
    # a NaN mean in every component: every row is NaN, none silently finite
    mu[:, 0] = float("nan")
    assert torch.isnan(gk.gmm_log_responsibilities(z, log_pi, mu, logvar, backend="cuda")).all()


def test_responsibilities_capture_in_a_cuda_graph():
    z, log_pi, mu, logvar = gmm_inputs(4096, 128, 16, seed=4)
    eager = gk.gmm_responsibilities(z, log_pi, mu, logvar, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gk.gmm_responsibilities(z, log_pi, mu, logvar, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def test_extension_rejects_bad_input_with_value_error():
    from gavamoe_kernels._extension import extension

    z = torch.randn(10, 8, device=DEVICE)
    mu, iv, c = torch.randn(3, 8, device=DEVICE), torch.rand(3, 8, device=DEVICE), torch.randn(3, device=DEVICE)
    cases = [
        ((z[0], mu, iv, c), "z must have shape"),
        ((z.cpu(), mu, iv, c), "z must be a CUDA tensor"),
        ((z.long(), mu, iv, c), "z must have dtype"),
        ((z, mu[:, :4], iv, c), "D = z.shape"),
        ((z, mu, iv[:2], c), "inv_var must have shape"),
        ((z, mu, iv, c[:2]), "log_const must have shape"),
        ((z, mu.half(), iv, c), "mu must be float32"),
        ((z, mu.cpu(), iv, c), "mu is on"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            extension().gmm_log_prob(*args)
