"""Compile check of csrc/ for machines without a GPU (``make cuda-check``; CI runs it).

1. Every ``.cu`` file is compiled by the machine's ``nvcc`` for sm_90 (``CUDA_ARCH`` overrides)
   on its own, with warnings as errors: the kernels use no ATen, so no torch CUDA libraries
   are needed. ptxas reports each kernel's registers, stack frame, spills and static shared
   memory, printed as a table (a report, not a failure: whether a spill costs is for a GPU).
2. ``bindings.cpp`` is syntax-checked by the host compiler against the installed torch's
   headers. CPU wheels of torch ship the c10/cuda headers but not the one CMake generates
   (``c10/cuda/impl/cuda_cmake_macros.h``); an empty stand-in is supplied for the check only.

Nothing is linked or run. Exit status 1 on the first failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent
NVCC_FLAGS = ["-std=c++17", "-O3", "--Werror", "all-warnings", "-lineinfo"]


def _run(cmd: list[str]) -> str:
    """Run cmd; exit 1 if it fails. Returns its stderr (printed, less ptxas's resource lines)."""
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(1)
    sys.stderr.write("".join(line for line in done.stderr.splitlines(keepends=True)
                             if not (line.startswith("ptxas info") or re.match(r"\s+\d+ bytes stack frame", line))))
    return done.stderr


def kernel_resources(ptxas_log: str) -> list[tuple[str, int, int, int, int, int]]:
    """(kernel, registers, stack frame, spill stores, spill loads, static shared memory) for each
    entry function in the output of ``nvcc -Xptxas=-v``, names demangled where c++filt exists."""
    rows = []
    for block in ptxas_log.split("Compiling entry function ")[1:]:
        name = block.split("'")[1]
        figures = [re.search(pattern, block) for pattern in (r"Used (\d+) registers", r"(\d+) bytes stack frame",
                                                              r"(\d+) bytes spill stores", r"(\d+) bytes spill loads",
                                                              r"(\d+) bytes smem")]
        rows.append((name, *(int(m.group(1)) if m else 0 for m in figures)))
    filt = shutil.which("c++filt")
    if filt and rows:
        names = subprocess.run([filt], input="\n".join(r[0] for r in rows), capture_output=True, text=True)
        demangled = names.stdout.splitlines()
        if len(demangled) == len(rows):
            rows = [(_short(d), *r[1:]) for d, r in zip(demangled, rows, strict=True)]
    return rows


def _short(name: str) -> str:
    """A demangled kernel name without its namespaces and argument list."""
    name = name.replace("gavamoe::(anonymous namespace)::", "").removeprefix("void ")
    return name[:name.rfind("(")] if name.endswith(")") else name


def cuda_include(nvcc: str) -> Path:
    """The CUDA toolkit's include folder: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or beside nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent)]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    sys.exit("cuda_check: cuda_runtime.h not found; set CUDA_HOME to the CUDA toolkit")


def compile_kernels(nvcc: str, arch: str, out: Path) -> list[tuple]:
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        sys.exit("cuda_check: no .cu files in csrc/")
    rows = []
    for source in sources:
        log = _run([nvcc, f"-arch={arch}", *NVCC_FLAGS, "-Xptxas=-v", f"-I{CSRC}", "-c", str(source),
                    "-o", str(out / f"{source.stem}.o")])
        rows += kernel_resources(log)
    return rows


def print_resources(rows: list[tuple], arch: str) -> None:
    print(f"\nptxas for {arch}: registers, stack frame, spill stores / loads, static shared memory (bytes)")
    for name, regs, stack, stores, loads, smem in rows:
        print(f"  {regs:4d} regs  {stack:5d} stack  {stores:5d} / {loads:<5d} spill  {smem:6d} smem  {name}")
    spilling = sum(1 for r in rows if r[3] or r[4])
    print(f"{len(rows)} kernels, {spilling} with spills")


def check_bindings(include: Path, out: Path) -> None:
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        sys.exit("cuda_check: torch is not importable; run it with the project's venv (make cuda-check)")
    stub = out / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cxx = os.environ.get("CXX", "g++")
    system = [*include_paths(), str(out / "stub"), str(include), sysconfig.get_paths()["include"]]
    _run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
          "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{CSRC}",
          *(f"-isystem{p}" for p in system), str(CSRC / "bindings.cpp")])


def main() -> None:
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        sys.exit("cuda_check: nvcc not found on PATH (set NVCC to its path)")
    arch = os.environ.get("CUDA_ARCH", "sm_90")
    with tempfile.TemporaryDirectory(prefix="gavamoe-cuda-check-") as tmp:
        resources = compile_kernels(nvcc, arch, Path(tmp))
        check_bindings(cuda_include(nvcc), Path(tmp))
    print_resources(resources, arch)
    print(f"cuda_check: every csrc/*.cu compiles for {arch}; bindings.cpp passes the syntax check")


if __name__ == "__main__":
    main()
