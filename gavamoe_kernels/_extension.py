"""The compiled CUDA extension of csrc/: the installed ``gavamoe_kernels._C``, or a JIT build.

``pip install --no-build-isolation .`` on a machine with nvcc and a CUDA torch installs
``gavamoe_kernels._C`` (see setup.py). For development in a source checkout,
``GAVAMOE_CUDA_JIT=1`` builds csrc/ on first use with ``torch.utils.cpp_extension.load``
(cached by torch under ~/.cache/torch_extensions); :func:`jit_build` does the same by hand.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def jit_requested() -> bool:
    return os.environ.get("GAVAMOE_CUDA_JIT", "0") not in ("", "0") and CSRC.is_dir()


@functools.cache
def installed() -> bool:
    """The compiled extension gavamoe_kernels._C is installed (looked up once per process)."""
    return importlib.util.find_spec("gavamoe_kernels._C") is not None


def available() -> bool:
    """True when the extension is installed, or a JIT build from csrc/ was asked for."""
    return installed() or jit_requested()


def jit_build(verbose: bool = False):
    """Compile csrc/ for the GPUs of this machine (or TORCH_CUDA_ARCH_LIST) and load it."""
    from torch.utils.cpp_extension import load

    sources = [*sorted(CSRC.glob("*.cu")), CSRC / "bindings.cpp"]
    return load(
        name="gavamoe_kernels_C",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=verbose,
    )


@functools.cache
def extension():
    """The loaded extension module (imported once; JIT-built once when asked for)."""
    if installed():
        return importlib.import_module("gavamoe_kernels._C")
    if jit_requested():
        return jit_build()
    raise ImportError("the CUDA extension gavamoe_kernels._C is not built; see csrc/README.md")
