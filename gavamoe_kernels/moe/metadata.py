"""Triton routing metadata: the stable counting sort of the token-slots by expert.

Token-slot s = t * k + j carries expert topk_ids[t, j]. The grouped GEMMs need the slots in
expert order (stable: equal experts keep slot order), its inverse, and the per-expert counts:

    sorted_slots [n]  slot ids ordered by expert          n = T * k
    slot_pos     [n]  position of slot s in that order
    counts       [E]  slots per expert

No atomics and no host sync. Up to SLOT_BLOCK slots (decoding) one program does all of it;
beyond, three launches: 1. per-block histograms, 2. per-expert prefix over blocks, 3. in-block
rank and scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import pow2

SLOT_BLOCK = 128


@triton.jit
def _slot_rank(ids, s_mask, counts, re, BLOCK_S: tl.constexpr):
    """Sorted position of each slot of one block, without the offsets of earlier blocks:
    start of its expert + #{earlier slots in the block with the same expert}."""
    start = tl.sum(tl.where(re[None, :] < ids[:, None], counts[None, :], 0), axis=1)  # [BS]
    ri = tl.arange(0, BLOCK_S)
    same_before = (ids[:, None] == ids[None, :]) & (ri[None, :] < ri[:, None]) & s_mask[None, :]  # [BS, BS]
    return start + tl.sum(same_before.to(tl.int32), axis=1)


@triton.jit
def _slot_sort_small_kernel(
    ids_ptr,  # expert id per slot: [n], n <= BLOCK_S
    sorted_slots_ptr, slot_pos_ptr, counts_ptr,  # out: [n], [n], [E] int32
    n, E,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """All of the sort in one program: counts[e] = #{s : ids[s] = e}; pos(s) = rank of s;
    sorted_slots[pos(s)] = s;  slot_pos[s] = pos(s)."""
    rs = tl.arange(0, BLOCK_S)
    s_mask = rs < n
    re = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + rs, mask=s_mask, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == re[None, :]).to(tl.int32), axis=0)  # [BE]
    tl.store(counts_ptr + re, counts, mask=re < E)
    pos = _slot_rank(ids, s_mask, counts, re, BLOCK_S)
    tl.store(sorted_slots_ptr + pos, rs, mask=s_mask)
    tl.store(slot_pos_ptr + rs, pos, mask=s_mask)


@triton.jit
def _slot_block_hist_kernel(
    ids_ptr,  # expert id per slot: [n]
    block_counts_ptr,  # out: [NB, E] int32
    n, E,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """block_counts[b, e] = #{s in block b : ids[s] = e}."""
    b = tl.program_id(0)
    rs = b * BLOCK_S + tl.arange(0, BLOCK_S)
    re = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + rs.to(tl.int64), mask=rs < n, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == re[None, :]).to(tl.int32), axis=0)  # [BE]
    tl.store(block_counts_ptr + b.to(tl.int64) * E + re, counts, mask=re < E)


@triton.jit
def _slot_block_prefix_kernel(
    block_counts_ptr,  # [NB, E] int32
    block_offsets_ptr,  # out: [NB, E] int32, exclusive prefix over blocks
    counts_ptr,  # out: [E] int32
    NB, E,
    BLOCK_B: tl.constexpr,
):
    """block_offsets[b, e] = sum_{b' < b} block_counts[b', e];  counts[e] = total.  Grid: (E,)."""
    e = tl.program_id(0)
    running = tl.zeros([], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        c = tl.load(block_counts_ptr + rb.to(tl.int64) * E + e, mask=rb < NB, other=0)
        tl.store(block_offsets_ptr + rb.to(tl.int64) * E + e, running + tl.cumsum(c, 0) - c, mask=rb < NB)
        running += tl.sum(c)
    tl.store(counts_ptr + e, running)


@triton.jit
def _slot_scatter_kernel(
    ids_ptr,  # [n]
    block_offsets_ptr, counts_ptr,  # [NB, E], [E]
    sorted_slots_ptr, slot_pos_ptr,  # out: [n] int32 each
    n, E,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """pos(s) = start[e_s] + block_offsets[b, e_s] + #{s' < s in block b : e_s' = e_s};
    sorted_slots[pos(s)] = s;  slot_pos[s] = pos(s).  Stable: equal experts keep slot order."""
    b = tl.program_id(0)
    rs = b * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = rs < n
    re = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + rs.to(tl.int64), mask=s_mask, other=-1).to(tl.int32)
    counts = tl.load(counts_ptr + re, mask=re < E, other=0)
    block_off = tl.load(block_offsets_ptr + b.to(tl.int64) * E + ids, mask=s_mask, other=0)
    pos = _slot_rank(ids, s_mask, counts, re, BLOCK_S) + block_off
    tl.store(sorted_slots_ptr + pos.to(tl.int64), rs, mask=s_mask)
    tl.store(slot_pos_ptr + rs.to(tl.int64), pos, mask=s_mask)


def routing_metadata(topk_ids: torch.Tensor, num_experts: int):
    """(sorted_slots [n], slot_pos [n], counts [E]) int32, equal to the torch backend's stable sort."""
    flat = topk_ids.reshape(-1).contiguous()  # the kernels read slot s at flat + s
    n = flat.numel()
    device = flat.device
    sorted_slots = torch.empty(n, device=device, dtype=torch.int32)
    slot_pos = torch.empty(n, device=device, dtype=torch.int32)
    counts = torch.empty(num_experts, device=device, dtype=torch.int32)
    if n == 0:
        return sorted_slots, slot_pos, counts.zero_()
    block_e = pow2(num_experts)
    if n <= SLOT_BLOCK:
        _slot_sort_small_kernel[(1,)](flat, sorted_slots, slot_pos, counts, n, num_experts,
                                      BLOCK_S=pow2(n, 16), BLOCK_E=block_e)
        return sorted_slots, slot_pos, counts
    nb = triton.cdiv(n, SLOT_BLOCK)
    block_counts = torch.empty((nb, num_experts), device=device, dtype=torch.int32)
    block_offsets = torch.empty_like(block_counts)
    _slot_block_hist_kernel[(nb,)](flat, block_counts, n, num_experts, BLOCK_S=SLOT_BLOCK, BLOCK_E=block_e)
    _slot_block_prefix_kernel[(num_experts,)](
        block_counts, block_offsets, counts, nb, num_experts, BLOCK_B=min(1024, pow2(nb, 16))
    )
    _slot_scatter_kernel[(nb,)](
        flat, block_offsets, counts, sorted_slots, slot_pos, n, num_experts, BLOCK_S=SLOT_BLOCK, BLOCK_E=block_e
    )
    return sorted_slots, slot_pos, counts
