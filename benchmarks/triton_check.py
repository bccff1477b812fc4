"""Every Triton kernel of the library compiled for a Hopper GPU on a machine without one.

    python -m benchmarks.triton_check [--arch 90] [--configs all|default] [--out FILE.md]   # make triton-check

The kernels' host code runs as it runs on a GPU (Triton compiled, not interpreted), at the
benchmark shapes, in float32 and bfloat16, with and without TMA loads, forward and backward, but
every launch is recorded instead of run. Each distinct launch is then compiled by Triton for
``cuda:<arch>`` down to a cubin, with the configuration the GPU test suite uses (``default``:
``GAVAMOE_AUTOTUNE=0``) and, with ``--configs all``, with every configuration the autotuner would
try. Per compile: the registers a thread takes, its stack frame (where spilled registers go), the
shared memory Triton asks for at launch, and from these how many blocks fit on one SM.

What this proves without a GPU: every kernel compiles with this Triton for that architecture, and
which configurations would fail at launch for want of shared memory (the autotuner drops those
silently; a failing default configuration would fail every GPU test). What it cannot: that the
cubin computes the right thing (the interpreter's tests) or how fast it runs (the benchmarks).

Exit status 1 when a default configuration fails to compile or does not fit, or when no
configuration of an autotuned launch does; 2 on bad flags or with ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import importlib.util
import inspect
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

# H100/H200 (sm_90): shared memory a block may opt into, and what one SM has (a block reserves 1 KiB)
MAX_SHARED_PER_BLOCK = 232448
SHARED_PER_SM, SHARED_RESERVED = 233472, 1024
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Job:
    """One compile: kernel ``module.name``, its signature (name -> Triton type or "constexpr"),
    constexpr values, pointer/integer arguments divisible by 16, and the launch options."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]
    options: tuple[tuple[str, int], ...]


@dataclass
class Uses:
    """Where a compile came from: the recorded launches (with their dtype) that need it, and
    whether it is the configuration the GPU test suite runs for one of them (``default``) rather
    than one only the autotuner tries."""

    launches: list[str] = field(default_factory=list)
    default: bool = False
    tuned_calls: list[tuple[int, str]] = field(default_factory=list)  # (call, launch) it is a configuration of


@dataclass
class Row:
    """One compile's outcome: its error, or the resources of its cubin."""

    job: Job
    uses: Uses
    error: str | None = None
    registers: int = 0
    stack_bytes: int = 0  # per thread: the stack frame, where ptxas puts the registers it spills
    shared_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= MAX_SHARED_PER_BLOCK

    def blocks_per_sm(self) -> int:
        warps = dict(self.job.options).get("num_warps", 4)
        per_warp = -(-self.registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        by_regs = REGISTERS_PER_SM // max(per_warp * warps, 1)
        by_shared = SHARED_PER_SM // (self.shared_bytes + SHARED_RESERVED)
        return min(by_regs, by_shared, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)


@dataclass
class Recorder:
    """Launches of JIT kernels and autotuned kernels, recorded instead of run."""

    jobs: dict[Job, Uses] = field(default_factory=dict)  # in first-seen order
    launch: str = ""  # what the driver is running, e.g. "route T=4096 ... float32"
    tuned_calls: int = 0

    def _add(self, fn, args, kwargs, configs):
        signature_of = inspect.signature(fn.fn)
        bound = signature_of.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in signature_of.parameters})
        bound.apply_defaults()
        given = {k: kwargs[k] for k in OPTIONS if kwargs.get(k) is not None}
        self.tuned_calls += configs is not None
        for meta, options, default in configs or [({}, given, True)]:
            values = {**bound.arguments, **meta}
            signature, constexprs, divisible = [], [], []
            for param in fn.params:
                value = values[param.name]
                kind, key = ("constexpr", value) if param.is_constexpr else _specialize(param, value)
                signature.append((param.name, kind))
                if kind == "constexpr":
                    constexprs.append((param.name, key))
                elif key == "D":
                    divisible.append(param.name)
            job = Job(fn.fn.__module__, fn.fn.__name__, tuple(signature), tuple(constexprs), tuple(divisible),
                      tuple(sorted(options.items())))
            uses = self.jobs.setdefault(job, Uses())
            uses.default |= default
            if self.launch not in uses.launches:
                uses.launches.append(self.launch)
            if configs is not None:
                uses.tuned_calls.append((self.tuned_calls, self.launch))

    @contextlib.contextmanager
    def recording(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self

        def jit_run(self, *args, grid=None, warmup=False, **kwargs):
            recorder._add(self, args, kwargs, None)

        def tuner_run(self, *args, **kwargs):
            kwargs.pop("grid", None), kwargs.pop("warmup", None)
            configs = [(c.kwargs, _config_options(c), i == 0) for i, c in enumerate(_configs_of(self))]
            recorder._add(self.fn, args, kwargs, configs)

        with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuner_run):
            yield self


def _specialize(param, value) -> tuple:
    """(Triton type, "D" when divisible by 16) of an argument, or ("constexpr", 1) for an integer 1:
    what Triton's JIT makes of it (its own routine, so the compile is the one a launch would make)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


def _config_options(config) -> dict:
    return {k: getattr(config, k) for k in OPTIONS if getattr(config, k, None) is not None}


def _same(a, b) -> bool:
    return a.kwargs == b.kwargs and _config_options(a) == _config_options(b)


def _configs_of(tuner) -> list:
    """Every configuration of an autotuned kernel, the default first (``_triton.tuned`` keeps
    both; a plain ``triton.autotune`` has only its list, whose first is taken as the default)."""
    configs = list(getattr(tuner, "gpu_configs", tuner.configs))
    default = getattr(tuner, "default_config", configs[0])
    return [default] + [c for c in configs if not _same(c, default)]


def record_library(dtypes=(torch.float32, torch.bfloat16)) -> dict[Job, Uses]:
    """Every launch of the library's kernels at the benchmark shapes (CPU tensors; nothing runs)."""
    from benchmarks.bench_gmm import COMPONENTS, D
    from benchmarks.bench_moe import GPT2, LLAMA, E, K
    from benchmarks.bench_router import C as CLUSTERS
    from gavamoe_kernels import _triton
    from gavamoe_kernels.gmm import kernels as gmm
    from gavamoe_kernels.moe import grouped_gemm, routing

    recorder = Recorder()
    g = torch.Generator().manual_seed(0)
    with recorder.recording():
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            # router: bench_router's clusters and experts, FAME's heads (C=2, E=N=4), the widest
            # all-cluster gates (C x E = 256: C=4, E=64 and C=1, E=256) and the per-cluster path (C=8, E=64)
            for T, H, C, n_experts, k in ((4096, LLAMA[0], CLUSTERS, E, K), (8192, GPT2[0], 2, 4, 4),
                                          (4096, 4096, 4, 64, 2), (4096, 4096, 1, 256, 2), (4096, 4096, 8, 64, 8)):
                recorder.launch = f"route T={T} H={H} C={C} E={n_experts} k={k} {name}"
                x = torch.randn(T, H, generator=g).to(dtype)
                gate = torch.randn(C, n_experts, H, generator=g).to(dtype)
                cids = torch.randint(0, C, (T,), generator=g)
                for normalize in (True, False):
                    w, ids, logits = routing.route_fwd(x, gate, cids, k, normalize)
                    routing.route_bwd(torch.randn_like(w), torch.randn_like(logits), x, gate, cids, w,
                                      ids.clamp(0, n_experts - 1), logits, normalize)
            # experts: bench_moe's two sizes (the paper's), prefill and decoding, with and without TMA loads
            for T, (H, I) in ((4096, LLAMA), (8192, GPT2), (16, LLAMA), (1, GPT2)):
                x = torch.randn(T, H, generator=g).to(dtype)
                w1 = torch.randn(E, 2 * I, H, generator=g).to(dtype)
                w2 = torch.randn(E, H, I, generator=g).to(dtype)
                ids = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
                weights = torch.rand(T, K, generator=g)
                for tma in (False, True) if _triton.TMA_SUPPORTED else (False,):
                    recorder.launch = f"experts T={T} H={H} I={I} E={E} k={K}{' TMA' if tma else ''} {name}"
                    # _use_tma takes the TMA path on a GPU or under the interpreter; here is neither
                    with _triton.use_tma(tma), mock.patch.object(grouped_gemm, "INTERPRET", True):
                        y, pre, slots, pos, counts = grouped_gemm.experts_fwd(x, weights, ids, w1, w2, True)
                        grouped_gemm.experts_bwd(torch.randn_like(y), x, weights, w1, w2, pre, slots, pos, counts)
                        grouped_gemm.experts_fwd(x, weights, ids, w1, w2, False)
            # Gaussian-mixture responsibilities: bench_gmm's D and numbers of components
            for n_components in COMPONENTS:
                recorder.launch = f"gmm N=65536 D={D} K={n_components} {name}"
                z = torch.randn(65536, D, generator=g).to(dtype)
                mu = torch.randn(n_components, D, generator=g).to(dtype)
                log_pi = torch.zeros(n_components, dtype=dtype)
                logvar = torch.zeros(n_components, D, dtype=dtype)
                log_gamma, log_norm = gmm.log_prob_fwd(z, log_pi, mu, logvar)
                gmm.log_prob_bwd(torch.randn_like(log_gamma), log_norm, z, log_pi, mu, logvar, log_gamma)
    return recorder.jobs


def library_kernels() -> set[str]:
    """``module.name`` of every kernel of the library: the @triton.jit functions named ``*_kernel``
    (the others are device functions those call)."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    import gavamoe_kernels

    names = set()
    for info in pkgutil.walk_packages(gavamoe_kernels.__path__, "gavamoe_kernels."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or "@triton.jit" not in Path(spec.origin).read_text():
            continue  # no kernel here (cuda_impl.py needs the built extension even to import)
        module = vars(importlib.import_module(info.name))
        names |= {f"{info.name}.{n}" for n, v in module.items() if isinstance(v, JITFunction) and n.endswith("_kernel")}
    return names


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def compile_job(job: Job, uses: Uses, arch: int) -> Row:
    """Compile one job to a cubin; its registers and stack frame (spills) from cuobjdump, its
    shared memory from Triton's metadata (what the launch asks for)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(job.module), job.name)
    if not hasattr(fn, "params"):  # a kernel decorated by @triton.autotune itself: its JIT function
        fn = fn.fn
    names = [n for n, _ in job.signature]
    constexprs = {(names.index(n),): v for n, v in job.constexprs}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in job.divisible}
    source = triton.compiler.ASTSource(fn=fn, signature=dict(job.signature), constexprs=constexprs, attrs=attrs)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(job.options))
    except Exception as e:  # any compile failure is a finding
        return Row(job, uses, error=_error_line(e))
    row = Row(job, uses, shared_bytes=int(kernel.metadata.shared))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    row.registers, row.stack_bytes = int(found.get("REG", 0)), int(found.get("STACK", 0))
    return row


def _error_line(e: BaseException) -> str:
    """Where (Triton's "at line:column") and the innermost cause, on one line."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()] or [""]
    # Triton's CompilationError: "at line:column:", the source, then the message
    where, what = (lines[0], lines[-1]) if len(lines) > 1 and lines[0].startswith("at ") else ("", lines[0])
    return f"{type(root).__name__} {where} {what}".replace("|", "/")[:300]


@contextlib.contextmanager
def private_cache():
    """A Triton cache of the block's own, so every compile is made (and timed) and the user's cache is
    left alone; TRITON_CACHE_DIR (read by the spawned workers) is as it was after the block."""
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="triton-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield cache
        finally:
            if before is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = before


def compile_all(jobs: dict[Job, Uses], arch: int, workers: int, progress=None) -> list[Row]:
    rows: list[Row | None] = [None] * len(jobs)
    # spawn: each worker imports the kernels itself, Triton compiled (no state of this process)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_job, job, uses, arch): i for i, (job, uses) in enumerate(jobs.items())}
        for done in concurrent.futures.as_completed(futures):
            rows[futures[done]] = done.result()
            if progress is not None:
                progress.update()
    return rows  # type: ignore[return-value]


def failures(rows: list[Row], missing: set[str] | frozenset = frozenset()) -> list[str]:
    """What fails the check: a kernel of the library never launched (``missing``), a default
    configuration that does not compile or fit, or a recorded launch of an autotuned kernel none
    of whose configurations does."""
    out = [f"{name}: never launched by record_library" for name in sorted(missing)]
    out += [f"{r.job.name} [{r.uses.launches[0]}] default configuration: "
           f"{r.error or f'{r.shared_bytes} B of shared memory > {MAX_SHARED_PER_BLOCK}'}"
           for r in rows if r.uses.default and not r.fits]
    by_call: dict[tuple[int, str], list[Row]] = {}
    for r in rows:
        for call in r.uses.tuned_calls:
            by_call.setdefault(call, []).append(r)
    out += [f"{g[0].job.name} [{launch}]: none of its {len(g)} configurations compiles and fits"
            for (_, launch), g in by_call.items() if len(g) > 1 and not any(r.fits for r in g)]
    return out


def _describe(job: Job) -> str:
    """The constexprs that shape the compile, and the launch options."""
    shown = ", ".join(f"{n}={v}" for n, v in job.constexprs if n.isupper() and n not in ("PRECISION", "GROUP_M"))
    options = dict(job.options)
    return f"{shown}; {options.get('num_warps', 4)} warps, {options.get('num_stages', 3)} stages"


def report(rows: list[Row], arch: int, configs: str, seconds: float, missing: set[str]) -> str:
    import triton

    bad = failures(rows, missing)
    lines = [
        f"# Triton kernels compiled for sm_{arch} without a GPU",
        "",
        f"`python -m benchmarks.triton_check --arch {arch} --configs {configs}`: Triton {triton.__version__}, "
        f"torch {torch.__version__}; {len(rows)} distinct compiles in {seconds:.0f} s on {os.cpu_count()} CPU cores.",
        "",
        "Registers and stack bytes per thread (the stack frame holds what ptxas spills) from cuobjdump;",
        "shared memory as Triton "
        f"asks for it at launch (at most {MAX_SHARED_PER_BLOCK} B a block on sm_90); blocks per SM: the",
        "fewest that registers, shared memory and warps allow. `default`: the configuration the GPU",
        "tests run (GAVAMOE_AUTOTUNE=0); the others only the autotuner tries, and it drops those that",
        "do not fit. `launch`: the first recorded launch that needs the compile (of how many).",
        "",
        f"**{'PASS' if not bad else 'FAIL'}**" + ("" if not bad else ": " + "; ".join(bad)),
        "",
        "| kernel | launch | configuration | default | registers | stack B | shared KiB | blocks/SM | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.job.name, not r.uses.default)):
        ok = r.error is None
        status = r.error or ("ok" if r.fits else "does not fit")
        lines.append(f"| {r.job.name} | {r.uses.launches[0]} ({len(r.uses.launches)}) | {_describe(r.job)} | "
                     f"{'yes' if r.uses.default else ''} | {r.registers if ok else ''} | "
                     f"{r.stack_bytes if ok else ''} | {r.shared_bytes / 1024 if ok else 0:.1f} | "
                     f"{r.blocks_per_sm() if ok else ''} | {status} |")
    for dtype in ("bfloat16", "float32"):
        spilling = sorted({f"{r.job.name} ({r.stack_bytes} B)" for r in rows if r.stack_bytes and r.uses.default
                           and any(launch.endswith(dtype) for launch in r.uses.launches)})
        lines += ["", f"Default configurations with a stack frame (spills), {dtype}: {', '.join(spilling) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, H200)")
    p.add_argument("--configs", choices=("default", "all"), default="all")
    p.add_argument("--out", type=Path, help="also write the report (printed in any case) here, as markdown")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_check: unset TRITON_INTERPRET; the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"triton_check: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    from gavamoe.progress import Progress

    start = time.perf_counter()
    recorded = record_library()
    missing = library_kernels() - {f"{j.module}.{j.name}" for j in recorded}
    jobs = {j: u for j, u in recorded.items() if args.configs == "all" or u.default}
    progress = Progress(total=len(jobs), desc=f"compiling for sm_{args.arch}")
    with private_cache():
        rows = compile_all(jobs, args.arch, args.workers, progress)
    progress.close()
    text = report(rows, args.arch, args.configs, time.perf_counter() - start, missing)
    print(text)
    if args.out:
        args.out.write_text(text)
    bad = failures(rows, missing)
    print(f"{len(rows)} compiles for sm_{args.arch}: {sum(r.error is None for r in rows)} compiled, "
          f"{sum(not r.fits for r in rows)} do not compile or fit; "
          + ("PASS" if not bad else "FAIL: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
