"""Shared by the benchmark suites: the device, which of our backends are timed, a synchronised
timer, and the figures each benchmark records for the report (benchmarks/report.py).

Every benchmark records in ``benchmark.extra_info``:
    case   what is measured at which shape (the report's table)
    impl   the implementation; role "ours", "peer" or "limit" (dense GEMM / copy at equal work)
    flops  floating-point work of one call, or bytes moved (``bytes``), for the rates
    checked  True once its output matched the reference: a speedup needs it on both sides
"""

from __future__ import annotations

import os

import torch

from gavamoe_kernels._backend import cuda_extension_built, triton_installed, triton_interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def our_backends(full_size: bool) -> list[str]:
    """Backends timed here. The Triton interpreter is checked in the smoke run, never timed."""
    if ON_GPU:
        names = ["torch"]
        if triton_installed():
            names.append("triton")
            if cuda_extension_built():
                names.append("cuda")
        return names
    return ["torch"] if full_size or not (triton_installed() and triton_interpret()) else ["torch", "triton"]


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def run_timed(benchmark, case: str, impl: str, role: str, fn, *args, flops: float | None = None,
              bytes_moved: float | None = None):
    """Time ``fn(*args)`` (synchronised on a GPU) under ``benchmark`` and record the report figures.
    The caller has checked the output first; on a GPU the peak memory of one more call is recorded."""
    benchmark.group = case
    benchmark.extra_info.update(case=case, impl=impl, role=role, flops=flops, bytes=bytes_moved, checked=True)

    def call():
        out = fn(*args)
        _sync()
        return out

    rounds = int(os.environ.get("GAVAMOE_BENCH_ROUNDS", "20" if ON_GPU else "5"))
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2 if ON_GPU else 1, iterations=1)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    """Device name, versions and git commit saved beside every figure."""
    import platform
    import subprocess

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = (torch.cuda.get_device_name() if ON_GPU
              else f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": commit, "cuda_extension": cuda_extension_built()}
