"""Triton plumbing shared by every kernel file: the interpreter flag, block-size helpers,
autotune configurations and launches, matmul precision, and the device's SM count.

Kernel modules import this module first, so ``INTERPRET`` is read at the moment their
``@triton.jit`` functions are created, which is when Triton itself reads ``TRITON_INTERPRET``.
``_backend.py`` compares it with the environment to catch a flag set too late.

Autotuning runs on a GPU. ``GAVAMOE_AUTOTUNE=0`` pins every kernel to its default
configuration there (fast compiles for the test suite); the interpreter always runs a small
fixed configuration (it cannot time configurations).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Sequence

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = not INTERPRET and os.environ.get("GAVAMOE_AUTOTUNE", "1") not in ("", "0")
# Tensor Memory Accelerator loads of the expert weights (Hopper). Off until a GPU measurement
# keeps them (benchmarks/NOTES.md); GAVAMOE_TMA=1 turns them on, where Triton has tensor descriptors.
TMA_SUPPORTED = hasattr(triton.language, "make_tensor_descriptor")
_tma = [os.environ.get("GAVAMOE_TMA", "0") not in ("", "0") and TMA_SUPPORTED]


def tma_enabled() -> bool:
    return _tma[0]


@contextlib.contextmanager
def use_tma(enabled: bool):
    """TMA weight loads on or off inside the block (the benchmarks time both)."""
    if enabled and not TMA_SUPPORTED:
        raise RuntimeError(f"Triton {triton.__version__} has no tensor descriptors (tl.make_tensor_descriptor)")
    previous, _tma[0] = _tma[0], enabled
    try:
        yield
    finally:
        _tma[0] = previous


def pow2(n: int, lo: int = 1) -> int:
    """The next power of two >= max(n, lo)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs get true fp32 products (no tf32), as torch.matmul does by default."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in for the interpreter on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def config_grid(names: Sequence[str], stages: Sequence[int] = (3, 4), **choices) -> list[triton.Config]:
    """Every combination of ``choices`` (in the order of ``names``) times ``stages``; 8 warps for
    tiles of 128 x 128 and more, else 4."""
    out = []
    for values in itertools.product(*(choices[n] for n in names)):
        meta = dict(zip(names, values, strict=True))
        warps = 8 if meta.get("BLOCK_M", 64) * meta.get("BLOCK_N", 64) >= 128 * 128 else 4
        out.extend(triton.Config(meta, num_warps=warps, num_stages=s) for s in stages)
    return out


def tuned(configs: list[triton.Config], key: list[str], default: dict, interpret: dict,
          default_warps: int = 4) -> Callable:
    """Decorator: autotune ``configs`` on ``key`` on a GPU; one configuration otherwise:
    ``default`` with GAVAMOE_AUTOTUNE=0, ``interpret`` (small blocks) under the interpreter.
    The autotuner keeps both GPU choices, ``gpu_configs`` and ``default_config``, for
    benchmarks/triton_check.py, which compiles each of them without a GPU."""
    default_config = triton.Config(default, num_warps=default_warps, num_stages=3)
    if AUTOTUNE:
        chosen = configs
    elif INTERPRET:
        chosen = [triton.Config(interpret, num_warps=4, num_stages=1)]
    else:
        chosen = [default_config]

    def decorate(fn):
        tuner = triton.autotune(configs=chosen, key=key)(fn)
        tuner.gpu_configs, tuner.default_config = configs, default_config
        return tuner

    return decorate


def row_chunks(rows: int, block: int, tiles: int, device: torch.device, programs: int,
               cpu_chunks: int) -> tuple[int, int]:
    """(chunks, rows per chunk) for a kernel that sums over rows in chunks and adds the chunk
    partials in a fixed order: each chunk a multiple of ``block`` rows (at least 4 blocks when
    there are rows enough), about ``programs`` programs in all with ``tiles`` per chunk on a
    GPU, ``cpu_chunks`` chunks under the interpreter."""
    chunks = max(1, min(triton.cdiv(rows, 4 * block), triton.cdiv(programs, tiles) if device.type == "cuda"
                        else cpu_chunks))
    per_chunk = triton.cdiv(triton.cdiv(rows, chunks), block) * block
    return triton.cdiv(rows, per_chunk), per_chunk


def rows_bucket(rows: int) -> int:
    """Autotune-key bucket of the rows an expert gets: powers of two from 16 to 16384, so the
    first batch size seen does not fix the configuration for every other."""
    return min(16384, pow2(rows, 16))


def set_tma_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need scratch memory from an allocator Triton calls."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
