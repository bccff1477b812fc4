"""The compiled Triton kernels on a GPU: no register spills in the router at E >= 64, the layer
in a CUDA graph (no host sync on its path), the TMA weight loads, and the device-side check of
cluster ids. GPU only (marked ``gpu``); the shared grids run the same kernels on every shape."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels.moe import reference as ref
from tests.helpers import DEVICE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("E", [12, 64, 256])
def test_router_kernels_do_not_spill_registers(E):
    import triton

    from gavamoe_kernels._triton import precision
    from gavamoe_kernels.moe import routing

    C = 4 if E <= 64 else 1
    T, H = 300, 512
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    gate = torch.randn(C, E, H, device=DEVICE, dtype=torch.bfloat16)
    cids = torch.randint(0, C, (T,), device=DEVICE)
    weights = torch.empty(T, 2, device=DEVICE)
    ids = torch.empty(T, 2, device=DEVICE, dtype=torch.int64)
    logits = torch.empty(T, E, device=DEVICE)
    blocks = routing._router_blocks(C, E)
    # launched, not warmed up: a launch returns the compiled kernel with its binary loaded, which is
    # when Triton (3.6 and 3.9) sets n_regs and n_spills; warmup()'s kernel has neither yet
    compiled = routing._route_fwd_kernel[(triton.cdiv(T, blocks["BLOCK_T"]),)](
        x, x.stride(0), x.stride(1), gate, *gate.stride(), cids, weights, ids, weights.stride(0), logits,
        logits.stride(0), T, C, E, H, K=2, NORMALIZE=True, PRECISION=precision(x.dtype), BLOCK_H=64, BLOCK_K=2,
        **blocks)
    assert compiled.n_spills == 0, (E, compiled.n_regs, compiled.n_spills)


@pytest.mark.parametrize("T", [5, 133])  # the decode path and the prefill path
def test_triton_layer_runs_in_a_cuda_graph(T):
    """Router, metadata and expert GEMMs launch with no host sync, so the layer captures."""
    torch.manual_seed(0)
    moe = gk.ClusterGatedMoE(64, 48, 12, 4, device=DEVICE, dtype=torch.bfloat16, backend="triton").eval()
    x = torch.randn(T, 64, device=DEVICE, dtype=torch.bfloat16)
    cids = torch.randint(0, 4, (T,), device=DEVICE)
    with torch.no_grad():
        eager = moe(x, cids)  # compiles the kernels, and checks the ids once, before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = moe(x, cids)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, moe(x, cids), atol=0, rtol=0)
    assert not torch.equal(captured, eager)


def test_tma_weight_loads_match_the_pointer_path():
    from gavamoe_kernels import _triton

    if not _triton.TMA_SUPPORTED:
        pytest.skip("this Triton has no tensor descriptors")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for T in (7, 700):
        x = torch.randn(T, 256, device=DEVICE, generator=g).bfloat16()
        w1 = (torch.randn(12, 2 * 160, 256, device=DEVICE, generator=g) / 16).bfloat16()
        w2 = (torch.randn(12, 256, 160, device=DEVICE, generator=g) / 13).bfloat16()
        ids = torch.rand(T, 12, device=DEVICE, generator=g).argsort(-1)[:, :2]
        w = torch.rand(T, 2, device=DEVICE, generator=g)
        plain = gk.moe_experts(x, w, ids, w1, w2, backend="triton")
        with _triton.use_tma(True):
            tma = gk.moe_experts(x, w, ids, w1, w2, backend="triton")
        want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double())
        scale = want.abs().max().item()
        assert (tma.double() - want).abs().max().item() <= 2 * (plain.double() - want).abs().max().item() + 1e-3 * scale


@pytest.mark.parametrize("mode", ["auto", "sync"])
def test_out_of_range_cluster_ids_on_a_gpu(mode):
    """On a GPU the id check is a device-side assertion (no host sync; CUDA reports it at the next
    synchronisation as a device-side assert, without our message, and the CUDA context ends, so
    this runs in a child process); with GAVAMOE_ID_CHECK=sync it is the CPU's ValueError."""
    code = textwrap.dedent("""
        import torch, gavamoe_kernels as gk
        x = torch.randn(6, 32, device="cuda")
        gate = torch.randn(3, 4, 32, device="cuda")
        try:
            gk.route(x, gate, torch.tensor([0, 1, 2, 3, 0, 1], device="cuda"), backend="torch")
            torch.cuda.synchronize()
        except ValueError as e:
            print("ValueError:", e)
        except RuntimeError as e:
            print("RuntimeError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "GAVAMOE_ID_CHECK": mode})
    text = out.stdout + out.stderr
    if mode == "sync":
        assert "ValueError: cluster_ids must hold values in [0, 3)" in text
    else:
        assert "device-side assert" in text and "ValueError" not in text
