"""Build script. Everything except the optional CUDA extension is declared in pyproject.toml.

The extension ``gavamoe_kernels._C`` (csrc/) is built with ``CUDAExtension`` (ninja when
installed) only when torch is importable in the build environment, is a CUDA build, and nvcc
is found; ``GAVAMOE_SKIP_CUDA_BUILD=1`` skips it. Architectures come from
``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0": the build never asks a GPU. Otherwise the
pure-Python packages install alone and the ``cuda`` backend reports itself unavailable.

pip builds in an isolated environment without torch by default, which skips the extension;
build it with ``pip install --no-build-isolation .`` (see csrc/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def cuda_sources() -> list[str]:
    """csrc/*.cu and the bindings, relative to the project root as setuptools wants them."""
    return [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")), "csrc/bindings.cpp"]


def cuda_build_plan(environ=os.environ) -> tuple[list, dict, str]:
    """(ext_modules, cmdclass, reason): the extension to build, or none and why not."""
    if environ.get("GAVAMOE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}, "GAVAMOE_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return [], {}, "nvcc was not found (set CUDA_HOME)"
    environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    extension = cpp_extension.CUDAExtension(
        name="gavamoe_kernels._C",
        sources=cuda_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [extension], {"build_ext": build_ext}, f"for TORCH_CUDA_ARCH_LIST={environ['TORCH_CUDA_ARCH_LIST']}"


if __name__ == "__main__":
    ext_modules, cmdclass, reason = cuda_build_plan()
    print(f"gavamoe: {'building' if ext_modules else 'skipping'} the CUDA extension gavamoe_kernels._C: {reason}")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
