"""Decoding as users run it: a step through LAYERS MoE layers, each with its own weights (so a
layer's active experts are not still in L2 from the step before), at T <= 256 tokens, eager and
captured in a CUDA graph, timed with CUDA events over many steps per round.

Rows: the experts given the routing (ours and the peers of bench_moe.py, the same ids and
weights for all), and our whole layer (router, metadata, experts). The limit is the
weight-read floor: a device copy whose read + write equals the active experts' weights of every
layer, so "% of limit" is the floor over the measured time (the target: within 1.5x, >= 67%).
A peer whose step cannot be captured (a host sync) has its graph row reported skipped.
"""

from __future__ import annotations

import functools

import pytest
import torch

import gavamoe_kernels as gk
from benchmarks import model, peers
from benchmarks.bench_moe import LLAMA, TINY, E, K
from benchmarks.common import DEVICE, DTYPE, ON_GPU, check_all, generator, our_backends, record_check, run_timed
from gavamoe_kernels.moe import reference

C = 4
LAYERS = 4 if ON_GPU else 2
DECODE = [1, 4, 16, 64, 256] if ON_GPU else [1, 16]


def decode_inputs(T: int, full_size: bool, seed: int = 0):
    """hidden [T,H], cluster ids [T], and per layer: gate [C,E,H], w_gate_up [E,2I,H], w_down [E,H,I],
    topk_weights [T,k] and topk_ids [T,k] from that layer's router (the same for every row)."""
    H, I = LLAMA if full_size else TINY["llama"]
    T = T if full_size else min(T, 9)
    g = generator(seed)
    hidden = torch.randn(T, H, device=DEVICE, generator=g).to(DTYPE)
    cids = torch.randint(0, C, (T,), device=DEVICE, generator=g)
    layers = []
    for _ in range(LAYERS):
        gate = (torch.randn(C, E, H, device=DEVICE, generator=g) / H**0.5).to(DTYPE)
        w1 = (torch.randn(E, 2 * I, H, device=DEVICE, generator=g) / H**0.5).to(DTYPE)
        w2 = (torch.randn(E, H, I, device=DEVICE, generator=g) / I**0.5).to(DTYPE)
        r = gk.route(hidden, gate, cids, top_k=K, backend="torch")
        layers.append((gate, w1, w2, r.topk_weights, r.topk_ids))
    return hidden, cids, layers


def _experts_step(fn, hidden, layers):
    return [fn(hidden, weights, ids, w1, w2) for _, w1, w2, weights, ids in layers]


def _layer_step(backend, hidden, cids, layers):
    return [gk.cluster_gated_moe(hidden, cids, gate, w1, w2, top_k=K, backend=backend) for gate, w1, w2, _, _ in layers]


def capture(step):
    """(replay, outputs) of ``step`` captured in a CUDA graph after warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph.replay, outputs


@functools.cache
def _compiled_decode() -> peers.Compiled:
    # what a user tries first for decoding: reduce-overhead (CUDA graphs inside) on a GPU
    return peers.Compiled(peers.grouped_mm_moe, mode="reduce-overhead" if ON_GPU else None)


def implementations(full_size: bool) -> dict:
    """name -> (role, kind, function or the reason it cannot run). kind: "experts" or "layer"."""
    impls: dict = {}
    for b in our_backends(full_size):
        impls[f"gavamoe-{b}"] = ("ours", "experts", functools.partial(gk.moe_experts, backend=b))
        impls[f"gavamoe-{b} layer"] = ("ours", "layer", b)
    impls["eager-loop"] = ("peer", "experts", peers.eager_per_expert_loop)
    grouped = peers.grouped_mm_available()
    impls["grouped_mm"] = ("peer", "experts", peers.grouped_mm_moe if grouped else "no grouped_mm in this torch")
    impls["torch.compile(grouped_mm)"] = ("peer", "experts", _compiled_decode() if grouped else
                                          "no grouped_mm in this torch")
    impls["liger-kernel"] = ("peer", "experts", peers.liger_available() or peers.liger_fused_moe)
    return impls


IMPL_NAMES = [*(f"gavamoe-{b}{suffix}" for b in ("torch", "triton", "cuda") for suffix in ("", " layer")),
              "eager-loop", "grouped_mm", "torch.compile(grouped_mm)", "liger-kernel"]


@functools.lru_cache(maxsize=1)
def _reference(T, full_size):
    """float64 and plain-DTYPE outputs of every layer's experts given its routing."""
    hidden, cids, layers = decode_inputs(T, full_size)
    with torch.no_grad():
        want = [reference.moe_experts(hidden.double(), w.double(), ids, w1.double(), w2.double())
                for _, w1, w2, w, ids in layers]
        base = [reference.moe_experts(hidden, w.to(DTYPE), ids, w1, w2) for _, w1, w2, w, ids in layers]
    return want, base, (hidden, cids, layers)


def _weight_bytes(layers, elem: int) -> float:
    """Bytes of the active experts' weights of every layer: what a decode step must read."""
    return float(sum(torch.unique(ids).numel() * (w1[0].numel() + w2[0].numel()) * elem
                     for _, w1, w2, _, ids in layers))


@pytest.mark.parametrize("graph", ["eager", "cuda-graph"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("T", DECODE, ids=[f"llama-T{t}" for t in DECODE])
def test_decode_step(benchmark, full_size, rates, T, impl, graph):
    impls = implementations(full_size)
    if impl not in impls:
        pytest.skip(f"{impl} is not timed on this machine")
    role, kind, fn = impls[impl]
    if isinstance(fn, str) and kind == "experts":
        pytest.skip(f"{impl}: {fn}")
    if graph == "cuda-graph" and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    if graph == "cuda-graph" and isinstance(fn, peers.Compiled):
        pytest.skip("torch.compile(mode='reduce-overhead') captures its own CUDA graphs: the eager row is that")
    want, base, (hidden, cids, layers) = _reference(T, full_size)
    compiles_before = peers.compiles_so_far(fn)
    with torch.no_grad():
        step = ((lambda: _layer_step(fn, hidden, cids, layers)) if kind == "layer"
                else (lambda: _experts_step(fn, hidden, layers)))
        if graph == "cuda-graph":
            try:
                replay, outputs = capture(step)
            except Exception as failure:
                if role == "ours":
                    raise
                pytest.skip(f"{impl} cannot be captured in a CUDA graph: {type(failure).__name__}: "
                            f"{str(failure).splitlines()[0][:160]}")
            replay()
            timed = replay
        else:
            outputs, timed = step(), step
        if kind == "layer":  # its own router: check it picked the reference's experts, then the outputs
            want = [reference.moe_experts(hidden.double(), *_reference_weights(hidden, cids, gate), w1.double(),
                                          w2.double()) for gate, w1, w2, _, _ in layers]
        names = [f"layer {i} y" for i in range(LAYERS)]
        record_check(benchmark, role, lambda: check_all(names, outputs, want, base, DTYPE))
        info = peers.compile_info(fn, compiles_before)
        H, I = hidden.shape[1], layers[0][2].shape[2]
        prediction = None
        if role == "ours" and not impl.startswith("gavamoe-torch"):
            shape = model.MoEShape(hidden.shape[0], H, I, K, (0,) * E, hidden.element_size())
            active = [torch.unique(ids).numel() for *_, ids in layers]
            prediction = model.predict([kernel for a in active for kernel in
                                        model.decode_kernels(shape, a, rates, layer=kind == "layer", C=C)], rates)
        run_timed(benchmark, f"moe decode llama T={hidden.shape[0]} x {LAYERS} layers", f"{impl} ({graph})", role,
                  timed, flops=6.0 * hidden.shape[0] * K * H * I * LAYERS,
                  bytes_moved=_weight_bytes(layers, hidden.element_size()), prediction=prediction, **info)


def _reference_weights(hidden, cids, gate):
    """The float64 reference router's (weights, ids) for the layer rows."""
    weights, ids, _ = reference.route(hidden.double(), gate.double(), cids, K)
    return weights, ids


@pytest.mark.parametrize("T", DECODE, ids=[f"llama-T{t}" for t in DECODE])
def test_weight_read_floor(benchmark, full_size, T):
    """Copy bandwidth on a buffer whose read + write equals the active weights of the step."""
    _, _, (hidden, _, layers) = _reference(T, full_size)
    floor_bytes = _weight_bytes(layers, hidden.element_size())
    src = torch.empty(int(floor_bytes) // 2, device=DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    run_timed(benchmark, f"moe decode llama T={hidden.shape[0]} x {LAYERS} layers", "copy (read+write)", "limit",
              lambda: dst.copy_(src), bytes_moved=float(2 * src.numel()))
