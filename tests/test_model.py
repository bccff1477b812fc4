"""The benchmarks' traffic model (benchmarks/model.py) on shapes worked out by hand."""

from __future__ import annotations

import itertools

import pytest

from benchmarks import model

RATES = model.Rates(tensor_flops=1e12, fp32_flops=1e11, copy_bytes=1e9, l2_bytes=10**9, sms=2)


def test_grouped_order_by_hand():
    # 3 row tiles, 2 column tiles, groups of 2 row tiles: (0,0) (1,0) (0,1) (1,1), then the last row tile
    order = [model.grouped_coords(t, 3, 2, 2) for t in range(6)]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]


@pytest.mark.parametrize(("num_m", "num_n", "group"), [(7, 3, 2), (1, 5, 8), (9, 1, 4), (16, 16, 8)])
def test_every_tile_is_visited_once(num_m, num_n, group):
    tiles = model.Tiles(group_m=group)
    for order in ("grouped", "row"):
        visits = model.launch_order(num_m, num_n, model.Tiles(group_m=tiles.group_m, order=order))
        assert sorted(visits) == list(itertools.product(range(num_m), range(num_n)))


def test_row_tiles_are_per_expert():
    assert model.row_tiles([5, 0, 130], 64) == [(0, 5), (2, 64), (2, 64), (2, 2)]


def test_waves_count_each_block_once_and_reuse_the_previous_wave():
    tiles = [[("a", 10), ("b", 20)], [("a", 10), ("c", 20)]]
    assert model.wave_traffic(tiles, programs=2, l2_bytes=10**6) == 50  # one wave: a, b, c
    assert model.wave_traffic(tiles, programs=1, l2_bytes=10**6) == 50  # a from L2 in the second wave
    assert model.wave_traffic(tiles, programs=1, l2_bytes=40) == 60  # the first wave (30) overflows half of 40


def test_grouped_gemm_reads_by_hand():
    # one expert, 256 rows (2 row tiles of 128), N = 256 (2 column tiles of 128), K = 64, bf16:
    # an A block is 128 x 64 x 2 B = 16384 B, a B block 64 x 128 x 2 B = 16384 B
    tiles = model.Tiles(block_m=128, block_n=128, block_k=64, programs_per_sm=2)
    one_wave = model.Rates(1e12, 1e11, 1e9, l2_bytes=10**9, sms=2)  # 4 programs: one wave
    assert model.grouped_gemm_reads([256], 256, 64, 2, 2, tiles, one_wave) == 2 * 16384 + 2 * 16384
    # one program at a time and no L2 to speak of: every tile reads its A and its B block
    tiny = model.Rates(1e12, 1e11, 1e9, l2_bytes=1, sms=1)
    serial = model.Tiles(block_m=128, block_n=128, block_k=64, programs_per_sm=1, order="row")
    assert model.grouped_gemm_reads([256], 256, 64, 2, 2, serial, tiny) == 4 * (16384 + 16384)
    # the up-projection reads gate and up columns side by side: B blocks twice as wide
    assert model.grouped_gemm_reads([256], 256, 64, 2, 2, tiles, one_wave, b_width=2) == 2 * 16384 + 4 * 16384


def test_weight_grad_reads_by_hand():
    # one expert with 100 rows, out [M=128, N=256] in tiles of 128 x 128: programs (m=0, n=0), (0, 1);
    # L block 100 x 128 x 2 B read once (shared by both), R blocks 100 x 128 x 2 B each
    tiles = model.Tiles(block_m=128, block_n=128, programs_per_sm=2)
    assert model.weight_grad_reads([100], 128, 256, 2, tiles, RATES) == 3 * 100 * 128 * 2


def test_kernel_time_is_the_larger_term_and_a_call_sums_its_kernels():
    compute = model.Kernel("gemm", flops=2e12, dram_bytes=1e9)  # 2 s of compute, 1 s of memory
    memory = model.Kernel("copy", flops=0.0, dram_bytes=3e9)
    fp32 = model.Kernel("fma", flops=1e11, dram_bytes=0.0, unit="fp32")  # 1 s at the fp32 rate
    assert compute.seconds(RATES) == 2.0 and compute.bound(RATES) == "compute"
    assert memory.seconds(RATES) == 3.0 and memory.bound(RATES) == "memory"
    assert fp32.seconds(RATES) == 1.0
    prediction = model.predict([compute, memory, fp32], RATES)
    assert prediction["seconds"] == 6.0 and prediction["launches"] == 3 and prediction["dram_bytes"] == 4e9


def test_moe_flops_are_the_formula():
    shape = model.llama_shape(512)
    assert sum(shape.counts) == 512 * 2 and len(shape.counts) == 12
    train = model.predict(model.moe_training_kernels(shape, model.H100_KINDS), model.H100_KINDS)
    gemm_flops = 18.0 * 512 * 2 * 4096 * 1280
    assert gemm_flops <= train["flops"] <= gemm_flops * 1.01  # the GEMMs, plus combine and d-weight sums


def test_grouped_order_reads_less_than_row_order_at_the_llama_shape():
    shape = model.llama_shape(16384)
    grouped = model.grouped_gemm_reads(shape.counts, shape.I, shape.H, 2, 2, model.Tiles(), model.H100_KINDS, 2)
    row = model.grouped_gemm_reads(shape.counts, shape.I, shape.H, 2, 2, model.Tiles(order="row"), model.H100_KINDS, 2)
    x_bytes = shape.n * shape.H * 2
    assert row >= 9 * x_bytes  # ten column tiles each re-read every gathered row
    assert grouped < 2 * x_bytes + 12 * 2 * shape.I * shape.H * 2


def test_decode_reads_the_active_weights_once():
    shape = model.llama_shape(1)
    kernels = model.decode_kernels(shape, active=2, rates=model.H100_KINDS)
    weights = 2 * 3 * 1280 * 4096 * 2
    assert weights <= sum(k.dram_bytes for k in kernels) <= weights * 1.01
