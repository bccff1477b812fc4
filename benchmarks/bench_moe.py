"""The MoE experts (given the routing) against what users would pick instead: the eager
per-expert loop, PyTorch's grouped GEMM, and MegaBlocks (reported skipped: not wired). Every implementation
gets the same hidden states, weights, top-k ids and top-k weights; its output (and, for
training, its gradients) is checked against ours before it is timed.

Training: forward + backward (6 + 12 T k H I FLOPs). Decoding: forward only, against the floor
of reading the active experts' weights once. A dense matmul of equal FLOPs in the same run
gives the hardware rate the report measures against. The router is timed in bench_router.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import peers
from benchmarks.common import DEVICE, DTYPE, ON_GPU, our_backends, run_timed

E, K = 12, 2
LLAMA, GPT2 = (4096, 1280), (768, 256)  # (H, I): the paper's variants, I = dense FFN / E
if ON_GPU:
    TRAIN = [("llama", T) for T in (4096, 16384, 32768)] + [("gpt2", T) for T in (8192, 40960)]
    DECODE = [("llama", T) for T in (1, 4, 16, 64, 256)]
else:  # sized for a 2-core CPU
    TRAIN = [("llama", 512), ("gpt2", 2048)]
    DECODE = [("llama", T) for T in (1, 16)]
TINY = {"llama": (64, 24), "gpt2": (48, 16)}
ROUTINGS = ["uniform", "skewed"]


def moe_inputs(model: str, T: int, routing: str, full_size: bool, seed: int = 0):
    """hidden [T,H], topk_weights [T,k] fp32, topk_ids [T,k], w_gate_up [E,2I,H], w_down [E,H,I].
    Skewed routing draws experts with probability proportional to 1/(e+1) (expert 0 gets ~32%)."""
    H, I = (LLAMA if model == "llama" else GPT2) if full_size else TINY[model]
    T = T if full_size else min(T, 37)
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.ones(E) if routing == "uniform" else 1.0 / torch.arange(1, E + 1)
    ids = torch.multinomial(p.expand(T, E), K, replacement=False, generator=g)
    weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    hidden = torch.randn(T, H, generator=g)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    to = lambda t: t.to(DEVICE, DTYPE)
    return to(hidden), weights.to(DEVICE), ids.to(DEVICE), to(w_gate_up), to(w_down)


def implementations(full_size: bool) -> dict:
    impls = {f"gavamoe-{b}": functools.partial(gk.moe_experts, backend=b) for b in our_backends(full_size)}
    impls["eager-loop"] = peers.eager_per_expert_loop
    impls["grouped_mm"] = peers.grouped_mm_moe
    impls["megablocks"] = None
    return impls


IMPL_NAMES = implementations(full_size=False) | implementations(full_size=True)
ATOL = 3e-2 if DTYPE == torch.bfloat16 else 1e-3


def _skip_unavailable(impl: str, impls: dict) -> None:
    if impl == "megablocks":
        pytest.skip("MegaBlocks peer: megablocks is not installed here" if not peers.megablocks_importable() else
                    "MegaBlocks peer: not wired yet (no machine with megablocks has checked it against ours)")
    if impl not in impls:
        pytest.skip(f"{impl} is not timed on this machine")
    if impl == "grouped_mm" and not peers.grouped_mm_available():
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")


def _reference(*inputs):
    return gk.moe_experts(*inputs, backend="triton" if ON_GPU else "torch")


@pytest.mark.parametrize("impl", list(IMPL_NAMES))
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_moe_training_step(benchmark, full_size, shape, routing, impl):
    """Forward + backward of the experts: d hidden, d topk_weights, d w_gate_up, d w_down."""
    impls = implementations(full_size)
    _skip_unavailable(impl, impls)
    hidden, weights, ids, w1, w2 = moe_inputs(*shape, routing, full_size)
    leaves = [t.requires_grad_() for t in (hidden, weights, w1, w2)]
    d_y = torch.randn_like(hidden)

    def step(fn):
        for t in leaves:
            t.grad = None
        (fn(hidden, weights, ids, w1, w2) * d_y).sum().backward()
        return [t.grad for t in leaves]

    want = [g.clone() for g in step(_reference)]
    for name, got, ref in zip(("d hidden", "d weights", "d w_gate_up", "d w_down"), step(impls[impl]), want,
                              strict=True):
        scale = ref.abs().max().item() or 1.0
        torch.testing.assert_close(got.float() / scale, ref.float() / scale, atol=ATOL, rtol=0, msg=name)
    T, (H, I) = hidden.shape[0], (w2.shape[1], w2.shape[2])
    run_timed(benchmark, f"moe training {shape[0]} T={T} {routing}", impl,
              "ours" if impl.startswith("gavamoe") else "peer", step, impls[impl], flops=18.0 * T * K * H * I)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_dense_matmul_at_equal_flops(benchmark, full_size, shape, routing):
    """The hardware rate of the training case: a dense linear [T k, H] x [H, 3I] forward +
    backward, 18 T k H I FLOPs, the same work as the MoE step."""
    hidden, _, _, _, w2 = moe_inputs(*shape, routing, full_size)
    T, H, I = hidden.shape[0], w2.shape[1], w2.shape[2]
    x = hidden.repeat(K, 1).requires_grad_()
    w = torch.randn(3 * I, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    d_y = torch.randn(T * K, 3 * I, device=DEVICE, dtype=DTYPE)

    def step():
        x.grad = w.grad = None
        (x @ w.T).backward(d_y)

    run_timed(benchmark, f"moe training {shape[0]} T={T} {routing}", "dense matmul", "limit", step,
              flops=18.0 * T * K * H * I)


@pytest.mark.parametrize("impl", list(IMPL_NAMES))
@pytest.mark.parametrize("shape", DECODE, ids=[f"{m}-T{t}" for m, t in DECODE])
def test_moe_decode_forward(benchmark, full_size, shape, impl):
    """Forward at decoding sizes; bytes = the active experts' weights, read once at the floor."""
    impls = implementations(full_size)
    _skip_unavailable(impl, impls)
    inputs = moe_inputs(*shape, "uniform", full_size)
    hidden, _, ids, w1, w2 = inputs
    with torch.inference_mode():
        ref = _reference(*inputs)
        got = impls[impl](*inputs)
        scale = ref.abs().max().item() or 1.0
        torch.testing.assert_close(got.float() / scale, ref.float() / scale, atol=ATOL, rtol=0)
        active = torch.unique(ids).numel()
        weight_bytes = active * (w1[0].numel() + w2[0].numel()) * w1.element_size()
        run_timed(benchmark, f"moe decode {shape[0]} T={hidden.shape[0]}", impl,
                  "ours" if impl.startswith("gavamoe") else "peer", impls[impl], *inputs,
                  flops=6.0 * hidden.shape[0] * K * w2.shape[1] * w2.shape[2], bytes_moved=weight_bytes)


@pytest.mark.parametrize("shape", DECODE, ids=[f"{m}-T{t}" for m, t in DECODE])
def test_weight_read_floor(benchmark, full_size, shape):
    """Copy bandwidth on a buffer the size of the active experts' weights: the decoding floor."""
    _, _, ids, w1, w2 = moe_inputs(*shape, "uniform", full_size)
    active = torch.unique(ids).numel()
    src = torch.cat([w1[:active].reshape(-1), w2[:active].reshape(-1)])
    dst = torch.empty_like(src)
    # a copy reads and writes: 2x the bytes; the floor of the MoE is one read of them
    run_timed(benchmark, f"moe decode {shape[0]} T={ids.shape[0]}", "copy (read+write)", "limit", dst.copy_, src,
              bytes_moved=2.0 * src.numel() * src.element_size())
