"""Shared by the benchmark suites: the device, which of our backends are timed, the one ground
truth every row is checked against, the timer, and the figures each row records for the report.

Every benchmark records in ``benchmark.extra_info``:
    case        what is measured at which shape (the report's table)
    impl, role  the implementation; role "ours", "peer" or "limit" (dense GEMM / copy at equal work)
    flops, bytes  floating-point work of one call and the bytes it must move, for the rates
    call_seconds  the time of one call in each timed round (CUDA events on a GPU)
    checked     True once its output matched the float64 reference by the STYLE.md rule;
                False (with ``check``) for a peer that missed it: timed, shown, never compared
    prediction  for our rows: the traffic model's predicted seconds and its terms (model.py)
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import torch

from gavamoe_kernels._backend import cuda_extension_built, triton_installed, triton_interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROUND_SECONDS = 0.005  # a timed round runs the call enough times to last about this long
MAX_ITERATIONS = 1000


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


def generator(seed: int) -> torch.Generator:
    """Inputs are drawn on the benchmark device: no host-side generation and copy of gigabytes."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ---- one ground truth -----------------------------------------------------------------------

RELATIVE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


class CheckFailed(AssertionError):
    pass


def check_close(name: str, got: torch.Tensor, want64: torch.Tensor, baseline: torch.Tensor,
                dtype: torch.dtype) -> str:
    """The STYLE.md rule against the float64 reference: max |got - want| <= 2 x the error of plain
    torch in the kernel's dtype (``baseline``) + a small atol relative to the reference's scale.
    Returns a one-line summary; raises CheckFailed (NaN never passes)."""
    if got.shape != want64.shape:
        raise CheckFailed(f"{name}: shape {tuple(got.shape)} != reference {tuple(want64.shape)}")
    scale = want64.abs().max().item() if want64.numel() else 1.0
    err = _max_error(got, want64)
    allowed = 2 * _max_error(baseline, want64) + RELATIVE_ATOL[dtype] * max(scale, 1e-30)
    summary = f"{name}: error {err:.2e} (allowed {allowed:.2e})"
    if not err <= allowed:
        raise CheckFailed(summary)
    return summary


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.to(b.device, torch.float64) - b).abs()
    return math.inf if torch.isnan(diff).any() else diff.max().item()


def check_all(names: Sequence[str], got: Sequence[torch.Tensor], want64: Sequence[torch.Tensor],
              baseline: Sequence[torch.Tensor], dtype: torch.dtype) -> str:
    return "; ".join(check_close(n, g, w, b, dtype) for n, g, w, b in zip(names, got, want64, baseline, strict=True))


def record_check(benchmark, role: str, checker: Callable[[], str]) -> None:
    """Run ``checker``. Ours must pass (a wrong kernel fails its test, no figure); a peer that
    misses is still timed, marked ``checked: False`` with the reason, and never given a speedup."""
    try:
        benchmark.extra_info.update(checked=True, check=checker())
    except CheckFailed as failure:
        if role == "ours":
            raise
        benchmark.extra_info.update(checked=False, check=str(failure))


# ---- timing ---------------------------------------------------------------------------------

def _rounds() -> int:
    return int(os.environ.get("GAVAMOE_BENCH_ROUNDS", "15" if ON_GPU else "5"))


def time_calls(fn: Callable[[], object], iterations: int) -> float:
    """Seconds per call of ``iterations`` back-to-back calls: CUDA events around the loop on a
    GPU (one synchronisation per round, not per call), the host clock on the CPU."""
    if ON_GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iterations
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - t0) / iterations


def run_timed(benchmark, case: str, impl: str, role: str, fn: Callable[[], object] | None, *,
              flops: float | None = None, bytes_moved: float | None = None, prediction: dict | None = None,
              rounds: int | None = None, measured_seconds: list[float] | None = None, **info) -> None:
    """Time ``fn()`` under ``benchmark`` and record the report's figures. Two warm-up calls (compiles,
    autotuning, allocator), then ``rounds`` rounds of back-to-back calls lasting about ROUND_SECONDS
    each. ``measured_seconds``: a call timed already (a long fit that also served as the check),
    recorded as it is instead of being run again."""
    benchmark.group = case
    benchmark.extra_info.update(case=case, impl=impl, role=role, flops=flops, bytes=bytes_moved, **info)
    benchmark.extra_info.setdefault("checked", role == "limit")
    if prediction is not None:
        benchmark.extra_info["prediction"] = prediction
    if measured_seconds is not None:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        benchmark.extra_info.update(call_seconds=list(measured_seconds), iterations_per_round=1)
        return
    if benchmark.disabled:  # the correctness smoke (no --benchmark): one call, no warm-up, no rounds
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    fn()
    fn()
    sync()
    once = time_calls(fn, 1)
    iterations = max(1, min(MAX_ITERATIONS, math.ceil(ROUND_SECONDS / max(once, 1e-9)))) if ON_GPU else 1
    seconds: list[float] = []
    benchmark.pedantic(lambda: seconds.append(time_calls(fn, iterations)), rounds=rounds or _rounds(), iterations=1)
    benchmark.extra_info.update(call_seconds=seconds, iterations_per_round=iterations)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def backward_step(fn: Callable[..., torch.Tensor], leaves: Sequence[torch.Tensor], d_out: torch.Tensor):
    """The training step every training row times, ours, peers and the dense limit alike:
    out = fn(...); out.backward(d_out); no loss ops beyond that."""

    def step(*args):
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(*args), d_out)
        return [t.grad for t in leaves]

    return step


def measure_rates(full_size: bool):
    """Rates for the traffic model, measured here: a square matmul in DTYPE (8192 on a GPU), a
    square fp32 matmul (cuBLAS runs it on the CUDA cores), a device copy of 1 GiB (read + write).
    At smoke size (no --benchmark) the sizes are tiny: the figures only exercise the code."""
    from benchmarks.model import Rates

    n_mm, n_copy = (8192, 1 << 28) if ON_GPU and full_size else ((1024, 1 << 24) if full_size else (64, 1 << 12))
    g = generator(0)

    def rate(dtype, n):
        a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
        for _ in range(2):
            a @ b
        sync()
        return 2.0 * n**3 / min(time_calls(lambda: a @ b, 3 if full_size else 1) for _ in range(3))

    tensor = rate(DTYPE, n_mm)
    fp32 = rate(torch.float32, n_mm // 2 if ON_GPU and full_size else n_mm)
    src = torch.empty(n_copy, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    copy = 2.0 * src.numel() * 4 / min(time_calls(lambda: dst.copy_(src), 5) for _ in range(3))
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        l2, sms = props.L2_cache_size, props.multi_processor_count
    else:
        l2, sms = 32 * 2**20, os.cpu_count() or 1
    return Rates(tensor, fp32, copy, l2, sms, source=f"measured in this run on {environment()['device']}")


@functools.cache
def environment() -> dict:
    """Device name, versions and git commit saved beside every figure."""
    import platform
    import subprocess

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("GAVAMOE_COMMIT")  # the GPU machine's copy of the tree has no .git
    if not commit:
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
            "cuda": torch.version.cuda, "commit": commit, "cuda_extension": cuda_extension_built(),
            "autotune": os.environ.get("GAVAMOE_AUTOTUNE", "1"), "tma": os.environ.get("GAVAMOE_TMA", "0")}
