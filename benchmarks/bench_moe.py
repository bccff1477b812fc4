"""The MoE experts (given the routing), training step and forward, against what users would pick
instead: the eager per-expert loop, PyTorch's grouped GEMM and ``torch.compile`` of it,
Liger-Kernel's fused MoE, and MegaBlocks (reported skipped where it is not importable). Every
row gets the same hidden states, weights, top-k ids and top-k weights, and its output (and, for
training, its four gradients) is checked against the float64 reference by the STYLE.md rule
before it is timed.

Training: forward + backward, out.backward(d_y) (18 T k H I FLOPs), against a dense linear
[T k, H] x [H, 3I] forward + backward of the same FLOPs through the same step. Forward: no
grad, against the dense forward (6 T k H I FLOPs). Decoding is in bench_decode.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import model, peers
from benchmarks.common import (
    DEVICE,
    DTYPE,
    ON_GPU,
    backward_step,
    check_all,
    generator,
    our_backends,
    record_check,
    run_timed,
)
from gavamoe_kernels._backend import triton_installed
from gavamoe_kernels.moe import reference

E, K = 12, 2
LLAMA, GPT2 = (4096, 1280), (768, 256)  # (H, I): the paper's variants, I = dense FFN / E
if ON_GPU:
    TRAIN = [("llama", T) for T in (4096, 16384, 32768)] + [("gpt2", T) for T in (8192, 40960)]
else:  # sized for a 2-core CPU
    TRAIN = [("llama", 512), ("gpt2", 2048)]
TINY = {"llama": (64, 24), "gpt2": (48, 16)}
ROUTINGS = ["uniform", "skewed"]
GRADIENTS = ("d hidden", "d topk_weights", "d w_gate_up", "d w_down")


def sizes(model_name: str, T: int, full_size: bool) -> tuple[int, int, int]:
    H, I = (LLAMA if model_name == "llama" else GPT2) if full_size else TINY[model_name]
    return (T if full_size else min(T, 37)), H, I


def moe_inputs(model_name: str, T: int, routing: str, full_size: bool, seed: int = 0):
    """hidden [T,H], topk_weights [T,k] fp32, topk_ids [T,k], w_gate_up [E,2I,H], w_down [E,H,I],
    drawn on the device. Skewed routing draws experts with probability proportional to 1/(e+1)
    (expert 0 gets about 32% of the slots)."""
    T, H, I = sizes(model_name, T, full_size)
    g = generator(seed)
    p = torch.ones(E, device=DEVICE) if routing == "uniform" else 1.0 / torch.arange(1, E + 1, device=DEVICE)
    ids = torch.multinomial(p.expand(T, E), K, replacement=False, generator=g)
    weights = torch.softmax(torch.randn(T, K, device=DEVICE, generator=g), -1)
    hidden = torch.randn(T, H, device=DEVICE, generator=g).to(DTYPE)
    w_gate_up = (torch.randn(E, 2 * I, H, device=DEVICE, generator=g) / H**0.5).to(DTYPE)
    w_down = (torch.randn(E, H, I, device=DEVICE, generator=g) / I**0.5).to(DTYPE)
    return hidden, weights, ids, w_gate_up, w_down


def _with_tma(*args):
    """Our Triton backend with the weights brought in by the Tensor Memory Accelerator."""
    from gavamoe_kernels import _triton

    with _triton.use_tma(True):
        return gk.moe_experts(*args, backend="triton")


def implementations(full_size: bool) -> dict:
    """name -> (role, function, or the reason it cannot run here)."""
    impls: dict = {f"gavamoe-{b}": ("ours", functools.partial(gk.moe_experts, backend=b))
                   for b in our_backends(full_size)}
    if "triton" in impls and triton_installed():
        from gavamoe_kernels import _triton

        impls["gavamoe-triton-tma"] = ("ours", _with_tma if _triton.TMA_SUPPORTED else
                                       "this Triton has no tensor descriptors")
    impls["eager-loop"] = ("peer", peers.eager_per_expert_loop)
    impls["grouped_mm"] = ("peer", peers.grouped_mm_moe if peers.grouped_mm_available() else
                           f"torch {torch.__version__} has no grouped_mm")
    impls["torch.compile(grouped_mm)"] = ("peer", _compiled_grouped_mm() if peers.grouped_mm_available() else
                                          f"torch {torch.__version__} has no grouped_mm")
    reason = peers.liger_available()
    impls["liger-kernel"] = ("peer", reason or peers.liger_fused_moe)
    impls["megablocks"] = ("peer", "megablocks is not installed here" if not peers.megablocks_importable() else
                           "MegaBlocks peer: not wired yet (no machine with megablocks has checked it against ours)")
    return impls


@functools.cache
def _compiled_grouped_mm() -> peers.Compiled:
    return peers.Compiled(peers.grouped_mm_moe)


IMPL_NAMES = ["gavamoe-torch", "gavamoe-triton", "gavamoe-cuda", "gavamoe-triton-tma", "eager-loop", "grouped_mm",
              "torch.compile(grouped_mm)", "liger-kernel", "megablocks"]


def _implementation(impl: str, full_size: bool):
    impls = implementations(full_size)
    if impl not in impls:
        pytest.skip(f"{impl} is not timed on this machine")
    role, fn = impls[impl]
    if isinstance(fn, str):
        pytest.skip(f"{impl}: {fn}")
    return role, fn


@functools.lru_cache(maxsize=1)
def _training_reference(shape, routing, full_size):
    """(float64 grads, grads of plain torch in DTYPE, inputs, d_y) for one case, on the device."""
    inputs = moe_inputs(*shape, routing, full_size)
    d_y = torch.randn(inputs[0].shape, device=DEVICE, generator=generator(7)).to(DTYPE)

    def grads(dtype):
        hidden, weights, ids, w1, w2 = inputs
        leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weights, w1, w2)]
        step = backward_step(reference.moe_experts, leaves, d_y.to(dtype))
        return step(leaves[0], leaves[1], ids, leaves[2], leaves[3])

    return grads(torch.float64), grads(DTYPE), inputs, d_y


@functools.lru_cache(maxsize=1)
def _forward_reference(shape, routing, full_size):
    inputs = moe_inputs(*shape, routing, full_size)
    hidden, weights, ids, w1, w2 = inputs
    with torch.no_grad():
        want = reference.moe_experts(hidden.double(), weights.double(), ids, w1.double(), w2.double())
        base = reference.moe_experts(hidden, weights.to(DTYPE), ids, w1, w2)
    return want, base, inputs


def _moe_shape(inputs) -> model.MoEShape:
    hidden, _, ids, _, w2 = inputs
    counts = torch.bincount(ids.reshape(-1), minlength=E).tolist()
    return model.MoEShape(hidden.shape[0], w2.shape[1], w2.shape[2], K, tuple(counts), hidden.element_size())


def _prediction(impl: str, kernels_of, inputs, rates):
    if not impl.startswith("gavamoe"):
        return None
    shape = _moe_shape(inputs)
    if impl == "gavamoe-torch":
        return model.predict(model.torch_backend_forward_kernels(shape), rates) if kernels_of == "forward" else None
    kernels = (model.moe_training_kernels(shape, rates) if kernels_of == "training"
               else model.moe_forward_kernels(shape, rates))
    return model.predict(kernels, rates)


def _check_and_time(benchmark, fn, impl, role, step, model_name, routing, inputs, rates, check, call):
    """Check ``fn`` against float64, then time it as the row "moe <step> <model> T=<T> <routing>";
    the compile figures count the compiles of both. ``step``: "training" (18 T k H I FLOPs, the
    forward's 6 plus the backward's 12) or "forward"."""
    compiles_before = peers.compiles_so_far(fn)
    record_check(benchmark, role, check)
    hidden, _, _, _, w2 = inputs
    T, H, I = hidden.shape[0], w2.shape[1], w2.shape[2]
    run_timed(benchmark, f"moe {step} {model_name} T={T} {routing}", impl, role, call,
              flops=(18.0 if step == "training" else 6.0) * T * K * H * I,
              prediction=_prediction(impl, step, inputs, rates), **peers.compile_info(fn, compiles_before))


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_moe_training_step(benchmark, full_size, rates, shape, routing, impl):
    """Forward + backward of the experts: d hidden, d topk_weights, d w_gate_up, d w_down."""
    role, fn = _implementation(impl, full_size)
    want, base, inputs, d_y = _training_reference(shape, routing, full_size)
    hidden, weights, ids, w1, w2 = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weights, w1, w2)]
    step = backward_step(fn, leaves, d_y)
    args = (leaves[0], leaves[1], ids, leaves[2], leaves[3])
    _check_and_time(benchmark, fn, impl, role, "training", shape[0], routing, inputs, rates,
                    check=lambda: check_all(GRADIENTS, step(*args), want, base, DTYPE), call=lambda: step(*args))


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_moe_forward(benchmark, full_size, rates, shape, impl):
    """Forward only, no grad (uniform routing): the target is 70% of the dense matmul rate."""
    role, fn = _implementation(impl, full_size)
    want, base, inputs = _forward_reference(shape, "uniform", full_size)
    with torch.no_grad():
        _check_and_time(benchmark, fn, impl, role, "forward", shape[0], "uniform", inputs, rates,
                        check=lambda: check_all(("y",), (fn(*inputs),), (want,), (base,), DTYPE),
                        call=lambda: fn(*inputs))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_dense_matmul_at_equal_flops(benchmark, full_size, shape, routing):
    """The hardware rate of the training case: a dense linear [T k, H] x [H, 3I] through the same
    training step (out.backward(d_out)), 18 T k H I FLOPs, the MoE step's work."""
    T, H, I = sizes(*shape, full_size)
    g = generator(1)
    x = torch.randn(T * K, H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    w = torch.randn(3 * I, H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
    d_out = torch.randn(T * K, 3 * I, device=DEVICE, dtype=DTYPE, generator=g)
    step = backward_step(lambda a, b: a @ b.T, [x, w], d_out)
    run_timed(benchmark, f"moe training {shape[0]} T={T} {routing}", "dense matmul", "limit", lambda: step(x, w),
              flops=18.0 * T * K * H * I)


@pytest.mark.parametrize("shape", TRAIN, ids=[f"{m}-T{t}" for m, t in TRAIN])
def test_dense_forward_at_equal_flops(benchmark, full_size, shape):
    T, H, I = sizes(*shape, full_size)
    g = generator(1)
    x = torch.randn(T * K, H, device=DEVICE, dtype=DTYPE, generator=g)
    w = torch.randn(3 * I, H, device=DEVICE, dtype=DTYPE, generator=g)
    run_timed(benchmark, f"moe forward {shape[0]} T={T} uniform", "dense matmul", "limit", lambda: x @ w.T,
              flops=6.0 * T * K * H * I)
