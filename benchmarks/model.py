"""Traffic model of our kernels: for each kernel of a call, its floating-point work and the
DRAM bytes it moves as the kernel actually moves them (re-reads included), and the time that
predicts at rates measured in the same run:

    seconds(kernel) = max(flops / rate of the unit doing them, dram bytes / copy bandwidth)
    seconds(call)   = the sum over its kernels (they run one after another)

Units: "tensor" work runs at the dense matmul rate of the benchmark dtype (a large matmul
measured in the same run), "fp32" work at the fp32 FMA rate (a large fp32 matmul, which cuBLAS
runs on the CUDA cores). Copy bandwidth counts bytes read plus bytes written, as a device copy
measured in the same run does.

Re-reads of a tiled GEMM come from the launch order, modelled in waves: the persistent grid's
programs take tiles ``programs`` at a time in tile-id order; within a wave each distinct block
of A rows or of B columns is read from DRAM once; a block the previous wave also read is an L2
hit when that wave's blocks fit in half the L2 (the other half goes to outputs and to the
blocks of the wave in flight). The GEMM kernels' tile order (``grouped`` or ``row``-major) and
tile sizes are parameters, so a change to either is predicted before it is measured.

``python -m benchmarks.model`` prints the predictions at the paper's LLaMA shape.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

# ---- rates and the chip -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Ceilings measured in the run (or, for offline predictions, on an earlier run)."""

    tensor_flops: float  # dense matmul in the benchmark dtype, FLOP/s
    fp32_flops: float  # fp32 on the CUDA cores, FLOP/s
    copy_bytes: float  # device copy, bytes read + written per second
    l2_bytes: int = 50 * 2**20
    sms: int = 132
    source: str = ""


# KINDS.md of the device tool, measured on an H100 80GB HBM3 of this workplace on 2026-11-13:
# 8192^3 bf16 matmul 798 TFLOP/s, device copy 3.0 TB/s, 132 SMs, 50 MB L2. fp32 FMA: the datasheet's
# 67 TFLOP/s (not measured there). For predictions made before a GPU run; a run measures its own.
H100_KINDS = Rates(798e12, 67e12, 3.0e12, 50 * 2**20, 132, "H100 figures of KINDS.md (2026-11-13)")


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    dram_bytes: float
    unit: str = "tensor"  # "tensor" or "fp32"

    def _times(self, rates: Rates) -> tuple[float, float]:
        """(seconds of its FLOPs on its unit, seconds of its DRAM bytes)."""
        rate = rates.tensor_flops if self.unit == "tensor" else rates.fp32_flops
        return self.flops / rate, self.dram_bytes / rates.copy_bytes

    def seconds(self, rates: Rates) -> float:
        return max(self._times(rates))

    def bound(self, rates: Rates) -> str:
        compute, memory = self._times(rates)
        return "compute" if compute >= memory else "memory"


def predict(kernels: Sequence[Kernel], rates: Rates) -> dict:
    """The prediction a benchmark row records: total seconds, and each kernel's terms."""
    return {
        "seconds": sum(k.seconds(rates) for k in kernels),
        "flops": sum(k.flops for k in kernels),
        "dram_bytes": sum(k.dram_bytes for k in kernels),
        "launches": len(kernels),
        "kernels": [{"name": k.name, "flops": k.flops, "dram_bytes": k.dram_bytes, "seconds": k.seconds(rates),
                     "bound": k.bound(rates)} for k in kernels],
    }


# ---- tiles and waves --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """A GEMM kernel's tile shape, launch order and persistent grid (programs per SM)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    order: str = "grouped"  # "grouped" (GROUP_M row tiles finished across all columns) or "row"
    programs_per_sm: int = 2


def grouped_coords(tile: int, num_m: int, num_n: int, group_m: int) -> tuple[int, int]:
    """Tile id -> (row tile, column tile); the same mapping as grouped_gemm._tile_coords."""
    width = group_m * num_n
    first_m = (tile // width) * group_m
    size_m = min(num_m - first_m, group_m)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


def launch_order(num_m: int, num_n: int, tiles: Tiles) -> list[tuple[int, int]]:
    """(row tile, column tile) in the order the programs take them."""
    if tiles.order == "grouped":
        return [grouped_coords(t, num_m, num_n, tiles.group_m) for t in range(num_m * num_n)]
    return [(m, n) for n in range(num_n) for m in range(num_m)]  # row tile fastest: a column at a time


def wave_traffic(blocks_per_tile: Sequence[Sequence[tuple[Hashable, float]]], programs: int, l2_bytes: int) -> float:
    """DRAM bytes of reading the blocks the tiles need, ``programs`` tiles at a time (module docstring)."""
    total = 0.0
    previous: set = set()
    previous_fits = False
    for start in range(0, len(blocks_per_tile), programs):
        wave: dict = {}
        for tile in blocks_per_tile[start:start + programs]:
            wave.update(tile)
        total += sum(size for block, size in wave.items() if not (previous_fits and block in previous))
        previous = set(wave)
        previous_fits = sum(wave.values()) <= l2_bytes / 2
    return total


def row_tiles(counts: Sequence[int], block_m: int) -> list[tuple[int, int]]:
    """(expert, rows) of every real row tile, expert by expert: ceil(c_e / BM) tiles each."""
    return [(e, min(block_m, c - start)) for e, c in enumerate(counts) for start in range(0, c, block_m)]


def grouped_gemm_reads(counts: Sequence[int], N: int, K: int, a_elem: int, b_elem: int, tiles: Tiles,
                       rates: Rates, b_width: int = 1) -> float:
    """DRAM bytes a grouped GEMM reads for A (BM rows x K) and B (K x BN per expert, ``b_width``
    such blocks side by side: 2 for the up-projection's gate and up) over its tiles."""
    per_m = row_tiles(counts, tiles.block_m)
    num_n = math.ceil(N / tiles.block_n)
    order = launch_order(len(per_m), num_n, tiles)
    blocks = []
    for m, n in order:
        expert, rows = per_m[m]
        cols = min(tiles.block_n, N - n * tiles.block_n)
        blocks.append(((("a", m), rows * K * a_elem), (("b", expert, n), b_width * K * cols * b_elem)))
    return wave_traffic(blocks, tiles.programs_per_sm * rates.sms, rates.l2_bytes)


def weight_grad_reads(counts: Sequence[int], M: int, N: int, elem: int, tiles: Tiles, rates: Rates) -> float:
    """DRAM bytes of the per-expert weight gradient out[e] = L_e^T R_e ([M, N] per expert): grid
    (M tiles, N tiles, E), M tile fastest; each program reads its expert's rows of L (BM wide)
    and of R (BN wide)."""
    num_m, num_n = math.ceil(M / tiles.block_m), math.ceil(N / tiles.block_n)
    blocks = []
    for e, c in enumerate(counts):
        for n in range(num_n):
            for m in range(num_m):
                blocks.append(((("l", e, m), c * tiles.block_m * elem), (("r", e, n), c * tiles.block_n * elem)))
    return wave_traffic(blocks, tiles.programs_per_sm * rates.sms, rates.l2_bytes)


# ---- the MoE experts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEShape:
    T: int
    H: int
    I: int
    k: int
    counts: tuple[int, ...]  # token-slots per expert (sum = T * k)
    elem: int = 2  # bytes per element of hidden and weights (bf16)

    @property
    def n(self) -> int:
        return self.T * self.k

    @property
    def E(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class Variant:
    """The kernel choices a prediction is made for (defaults: what the code does now)."""

    tiles: Tiles = field(default_factory=Tiles)
    act_grad_block_n: int = 128
    input_grad_elem: int = 2  # bytes per element of the per-slot input gradient (fp32 before)
    weight_applied_once: bool = True  # the act-grad kernel writes w * act; dWd reads it unscaled


def _metadata(shape: MoEShape) -> Kernel:
    # ids read, sorted slots and positions written; block counts are small
    return Kernel("routing metadata", 0.0, shape.n * (8 + 4 + 4))


def _combine(shape: MoEShape, src_elem: int, name: str) -> Kernel:
    return Kernel(name, 2.0 * shape.n * shape.H, shape.n * shape.H * src_elem + shape.T * shape.H * shape.elem
                  + shape.n * 8, unit="fp32")


def moe_forward_kernels(shape: MoEShape, rates: Rates, variant: Variant = Variant(), save: bool = False) -> list:
    """Triton (and cuda) backend forward: metadata, up-projection with SwiGLU, down-projection, combine."""
    s, t, e = shape, variant.tiles, shape.elem
    up_reads = grouped_gemm_reads(s.counts, s.I, s.H, e, e, t, rates, b_width=2)
    up_writes = s.n * s.I * e + (s.n * 2 * s.I * e if save else 0)
    down_reads = grouped_gemm_reads(s.counts, s.H, s.I, e, e, t, rates)
    return [
        _metadata(s),
        Kernel("up-projection + SwiGLU", 2.0 * s.n * s.H * 2 * s.I, up_reads + up_writes + s.n * 4),
        Kernel("down-projection", 2.0 * s.n * s.I * s.H, down_reads + s.n * s.H * e),
        _combine(s, e, "combine (weighted)"),
    ]


def moe_backward_kernels(shape: MoEShape, rates: Rates, variant: Variant = Variant()) -> list:
    """Triton backward: activation gradient, two weight gradients, input gradient, combine, d weights."""
    s, t, e = shape, variant.tiles, shape.elem
    act_tiles = replace(t, block_n=variant.act_grad_block_n)
    act_reads = grouped_gemm_reads(s.counts, s.I, s.H, e, e, act_tiles, rates) + s.n * 2 * s.I * e + s.n * 4
    parts = math.ceil(s.I / 32)
    act_writes = s.n * 2 * s.I * e + s.n * s.I * e + s.n * parts * 4
    # without the weight applied once, dWd reads d_y rows and scales them per tile in registers:
    # the same bytes, one more multiply per element of L
    d_down = Kernel("weight gradient of w_down", 2.0 * s.n * s.H * s.I + (0 if variant.weight_applied_once else
                                                                          s.n * s.H * math.ceil(s.I / t.block_n)),
                    weight_grad_reads(s.counts, s.H, s.I, e, t, rates) + s.E * s.H * s.I * e)
    d_gate_up = Kernel("weight gradient of w_gate_up", 2.0 * s.n * 2 * s.I * s.H,
                       weight_grad_reads(s.counts, 2 * s.I, s.H, e, t, rates) + s.E * 2 * s.I * s.H * e)
    dx_reads = grouped_gemm_reads(s.counts, s.H, 2 * s.I, e, e, t, rates)
    return [
        Kernel("activation gradient", 2.0 * s.n * s.H * s.I, act_reads + act_writes),
        Kernel("d topk_weights (zero + sum of partials)", s.n * parts, 2 * s.n * parts * 4, unit="fp32"),
        d_down,
        d_gate_up,
        Kernel("input gradient per slot", 2.0 * s.n * 2 * s.I * s.H, dx_reads + s.n * s.H * variant.input_grad_elem),
        _combine(s, variant.input_grad_elem, "combine (input gradient)"),
    ]


def moe_training_kernels(shape: MoEShape, rates: Rates, variant: Variant = Variant()) -> list:
    return moe_forward_kernels(shape, rates, variant, save=True) + moe_backward_kernels(shape, rates, variant)


def torch_backend_forward_kernels(shape: MoEShape, save: bool = False) -> list:
    """The torch backend, op by op with compulsory bytes (each op reads its inputs and writes its
    outputs once; matmuls at the dense rate): per expert a gather, two matmuls and SwiGLU in fp32,
    then the per-token combine as a batched matmul in fp32."""
    s, e = shape, shape.elem
    kernels = [Kernel("sort (argsort, bincount, inverse)", 0.0, s.n * 8 * 6, unit="fp32")]
    for c in s.counts:
        if not c:
            continue
        kernels += [
            Kernel("gather rows", 0.0, 2 * c * s.H * e + c * 8),
            Kernel("up-projection matmul", 2.0 * c * s.H * 2 * s.I, (c * s.H + 2 * s.I * s.H + 2 * c * s.I) * e),
            Kernel("SwiGLU in fp32", 4.0 * c * s.I, c * 2 * s.I * e + c * s.I * e + (2 * c * s.I * e if save else 0),
                   unit="fp32"),
            Kernel("down-projection matmul", 2.0 * c * s.I * s.H, (c * s.I + s.I * s.H + c * s.H) * e),
        ]
    kernels.append(Kernel("combine (gather + bmm in fp32)", 2.0 * s.n * s.H,
                          s.n * s.H * (e + 4) + s.n * s.H * 4 + s.T * s.H * (4 + e), unit="fp32"))
    return kernels


def decode_kernels(shape: MoEShape, active: int, rates: Rates, layer: bool = False, C: int = 4) -> list:
    """Decoding (T <= 64) with the Triton backend: one row tile per active expert, so each active
    expert's weights are read once; with ``layer``, the router and its one-program metadata first."""
    s, e = shape, shape.elem
    weights_up = active * 2 * s.I * s.H * e
    weights_down = active * s.H * s.I * e
    router = [Kernel("router (all C*E gate rows, one dot)", 2.0 * s.T * C * s.E * s.H,
                     s.T * s.H * e + C * s.E * s.H * e + s.T * (s.E + 2 * s.k) * 4)] if layer else []
    return [
        *router,
        Kernel("routing metadata (one program)", 0.0, s.n * 16),
        Kernel("up-projection + SwiGLU", 2.0 * s.n * s.H * 2 * s.I, weights_up + s.T * s.H * e + s.n * s.I * e),
        Kernel("down-projection", 2.0 * s.n * s.I * s.H, weights_down + s.n * s.I * e + s.n * s.H * e),
        _combine(s, e, "combine (weighted)"),
    ]


# ---- router -------------------------------------------------------------------------------------


def router_kernels(T: int, H: int, E: int, C: int, k: int, elem: int, backward: bool = False) -> list:
    """The Triton router on tensor cores: x read once, the C*E gate rows from L2; logits and top-k
    written. Backward: d hidden (dl_wide @ W_all) and d gate (dl_wide^T @ x, chunk partials)."""
    e_pad = max(16, 2 ** math.ceil(math.log2(E)))
    c_pad = 2 ** math.ceil(math.log2(C))
    cols = c_pad * e_pad if c_pad * e_pad <= 256 else e_pad
    kernels = [Kernel("router forward", 2.0 * T * H * cols, T * H * elem + C * E * H * elem + T * (E + 3 * k) * 4)]
    if backward:
        kernels += [
            Kernel("router backward: d hidden", 2.0 * T * H * cols, T * (E * 4 * 3 + 3 * k * 4) + T * H * elem),
            Kernel("router backward: d gate", 2.0 * T * H * cols, T * H * elem + T * E * 4 + C * E * H * (4 + elem)),
        ]
    return kernels


# ---- Gaussian mixture ---------------------------------------------------------------------------


def gmm_forward_kernels(N: int, D: int, K: int, z_elem: int, block_k: int = 32) -> list:
    """Direct form: z read once (parameters from L2), log_gamma and the log-density written; past
    one component tile (K > block_k) log p is written, read back and normalised in place.
    3 FLOPs per (row, component, dimension)."""
    passes = 1 if K <= block_k else 3
    return [Kernel("responsibilities forward", 3.0 * N * K * D, N * D * z_elem + passes * N * K * 4 + N * 4,
                   unit="fp32")]


def gmm_backward_kernels(N: int, D: int, K: int, z_elem: int) -> list:
    """The per-row term (one torch reduction), d z (direct form: z, g and log_gamma read), and the
    moments as two dots per row tile (z, g and log_gamma read again)."""
    return [
        Kernel("per-row term", N * K, N * K * 4 + N * 8, unit="fp32"),
        Kernel("d z", 4.0 * N * K * D, N * D * z_elem * 2 + 2 * N * K * 4 + N * 4, unit="fp32"),
        Kernel("moments (two dots)", 4.0 * N * K * D, N * D * z_elem + 2 * N * K * 4 + N * 4, unit="fp32"),
    ]


# ---- the LLaMA shape, before and after each change ------------------------------------------------


def llama_shape(T: int = 16384, skewed: bool = False) -> MoEShape:
    """The paper's LLaMA shape (H=4096, I=1280, E=12, k=2) with uniform or 1/(e+1) routing."""
    E, k = 12, 2
    weights = [1.0 / (e + 1) if skewed else 1.0 for e in range(E)]
    total = sum(weights)
    counts = [round(T * k * w / total) for w in weights]
    counts[0] += T * k - sum(counts)
    return MoEShape(T, 4096, 1280, k, tuple(counts))


def _report(rates: Rates) -> str:
    """The predictions at the LLaMA shape for the kernel versions of benchmarks/NOTES.md."""
    shape = llama_shape()
    dense = 18.0 * shape.T * shape.k * shape.H * shape.I / rates.tensor_flops
    versions = {
        "before (row-major order, 64-wide act-grad tiles, fp32 dx, scale in dWd)":
            Variant(Tiles(order="row", block_n=128), act_grad_block_n=64, input_grad_elem=4,
                    weight_applied_once=False),
        "grouped tile order only": Variant(Tiles(order="grouped"), act_grad_block_n=64, input_grad_elem=4,
                                           weight_applied_once=False),
        "+ act-grad tiles 128 wide": Variant(Tiles(order="grouped"), act_grad_block_n=128, input_grad_elem=4,
                                             weight_applied_once=False),
        "+ weight applied once, bf16 dx (now)": Variant(),
        "now, 128 x 256 tiles": Variant(Tiles(block_n=256)),
    }
    lines = [f"Rates: {rates.source}", f"LLaMA shape T={shape.T} (n={shape.n} slots, uniform routing); "
             f"dense matmul at equal FLOPs (fwd+bwd): {dense * 1e3:.3f} ms", ""]
    for name, variant in versions.items():
        train = predict(moe_training_kernels(shape, rates, variant), rates)
        fwd = predict(moe_forward_kernels(shape, rates, variant), rates)
        lines.append(f"{name}: training {train['seconds'] * 1e3:.3f} ms ({dense / train['seconds']:.2f} of dense), "
                     f"forward {fwd['seconds'] * 1e3:.3f} ms ({dense / 3 / fwd['seconds']:.2f} of dense), "
                     f"DRAM {train['dram_bytes'] / 1e9:.2f} GB")
    lines.append("")
    for kernel in predict(moe_training_kernels(shape, rates), rates)["kernels"]:
        lines.append(f"  {kernel['name']:<42} {kernel['flops'] / 1e12:7.3f} TFLOP {kernel['dram_bytes'] / 1e9:7.3f} GB "
                     f"{kernel['seconds'] * 1e3:7.3f} ms ({kernel['bound']})")
    r = predict(router_kernels(shape.T, 4096, 12, 4, 2, 2), rates)
    rb = predict(router_kernels(shape.T, 4096, 12, 4, 2, 2, backward=True), rates)
    lines.append(f"router T={shape.T}: forward {r['seconds'] * 1e6:.1f} us ({r['dram_bytes'] / 1e6:.0f} MB), "
                 f"forward+backward {rb['seconds'] * 1e6:.1f} us")
    for K in (4, 16, 64):
        g = predict(gmm_forward_kernels(1 << 22, 128, K, 4), rates)
        gb = predict(gmm_forward_kernels(1 << 22, 128, K, 4) + gmm_backward_kernels(1 << 22, 128, K, 4), rates)
        floor = ((1 << 22) * 128 * 4 + (1 << 22) * K * 4) / rates.copy_bytes
        lines.append(f"gmm N=4M D=128 K={K}: forward {g['seconds'] * 1e3:.3f} ms ({g['kernels'][0]['bound']}; the "
                     f"copy of z and log_gamma {floor * 1e3:.3f} ms), forward+backward {gb['seconds'] * 1e3:.3f} ms")
    for T in (1, 16):
        s = llama_shape(T)
        active = min(s.E, T * s.k)
        floor = active * 3 * s.I * s.H * s.elem / rates.copy_bytes
        p = predict(decode_kernels(s, active, rates, layer=True), rates)
        lines.append(f"decode T={T}: {p['seconds'] * 1e6:.1f} us in {p['launches']} kernels; "
                     f"weight-read floor {floor * 1e6:.1f} us")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(_report(H100_KINDS) + "\n")
