"""Compile check of csrc/ for machines without a GPU (``make cuda-check``; CI runs it).

1. Every ``.cu`` file is compiled by the machine's ``nvcc`` for sm_90 (``CUDA_ARCH`` overrides)
   on its own, with warnings as errors: the kernels use no ATen, so no torch CUDA libraries
   are needed.
2. ``bindings.cpp`` is syntax-checked by the host compiler against the installed torch's
   headers. CPU wheels of torch ship the c10/cuda headers but not the one CMake generates
   (``c10/cuda/impl/cuda_cmake_macros.h``); an empty stand-in is supplied for the check only.

Nothing is linked or run. Exit status 1 on the first failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent
NVCC_FLAGS = ["-std=c++17", "-O3", "--Werror", "all-warnings", "-lineinfo"]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(1)


def cuda_include(nvcc: str) -> Path:
    """The CUDA toolkit's include folder: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or beside nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent)]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    sys.exit("cuda_check: cuda_runtime.h not found; set CUDA_HOME to the CUDA toolkit")


def compile_kernels(nvcc: str, arch: str, out: Path) -> None:
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        sys.exit("cuda_check: no .cu files in csrc/")
    for source in sources:
        _run([nvcc, f"-arch={arch}", *NVCC_FLAGS, f"-I{CSRC}", "-c", str(source), "-o", str(out / f"{source.stem}.o")])


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
        compile_kernels(nvcc, arch, Path(tmp))
        check_bindings(cuda_include(nvcc), Path(tmp))
    print(f"cuda_check: every csrc/*.cu compiles for {arch}; bindings.cpp passes the syntax check")


if __name__ == "__main__":
    main()
