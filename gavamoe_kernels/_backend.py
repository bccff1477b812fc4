"""Which implementation runs an op: "cuda" (the compiled csrc/ extension), "triton", or "torch".

Order of precedence: the ``backend=`` argument of a call, then the innermost
``use_backend(...)`` context, then the environment variable ``GAVAMOE_BACKEND``, then
automatic choice. Automatic choice prefers the built CUDA extension on a GPU, then Triton on
a GPU, then torch. A backend asked for explicitly that cannot run raises
``BackendUnavailableError``; it never falls back silently.

Triton runs on CPU tensors only through its interpreter, which Triton reads from
``TRITON_INTERPRET=1`` when the kernels are first compiled; set it before the first call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch

from . import _extension

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = (*BACKENDS, "auto")

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run on this machine or these tensors."""


def triton_interpret() -> bool:
    """True when Triton is told to run kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_built() -> bool:
    """The csrc/ extension is installed (or a JIT build of it was asked for: GAVAMOE_CUDA_JIT=1)."""
    return _extension.available()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {_CHOICES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` ("torch", "triton", "cuda", "auto")."""
    _check_name(name, "use_backend(name)")
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force for a call: argument, context, environment, else "auto"."""
    if backend is not None:
        return _check_name(backend, "backend")
    if _stack():
        return _stack()[-1]
    env = os.environ.get("GAVAMOE_BACKEND")
    if env:
        return _check_name(env, "GAVAMOE_BACKEND")
    return "auto"


def _why_unavailable(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    if name == "torch":
        return None
    if not triton_installed():
        return (f"the {name} backend runs on Triton (the cuda backend for its backward passes and expert GEMMs), "
                "which is not installed (pip install 'gavamoe[triton]')")
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors; got tensors on {device}"
        if not cuda_extension_built():
            return ("the CUDA extension gavamoe_kernels._C is not built "
                    "(pip install --no-build-isolation . on a machine with nvcc and a CUDA torch; see csrc/README.md)")
        return None
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        from . import _triton

        if not _triton.INTERPRET:
            return ("TRITON_INTERPRET=1 was set after the Triton kernels were first loaded; "
                    "set it before the first call")
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16; use float32 or float16 on the CPU, or the torch backend"
        return None
    return (
        f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the "
        f"first call; got tensors on {device}"
    )


# torch.compile runs the choice once, while tracing, and keeps its answer (a backend name) in the graph
@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None,
                    unsupported: Callable[[str], str | None] | None = None) -> str:
    """Pick the backend for tensors on ``device`` of ``dtype``.

    ``unsupported(name)`` says why a backend cannot run this call's shape (the cuda router's
    expert limit), or None. Automatic choice takes the first of "cuda", "triton", "torch" that
    is available and supported ("cuda" only with Triton installed too: it runs its backward
    passes and expert GEMMs on Triton). A backend asked for by name that cannot run raises
    BackendUnavailableError."""
    name = requested_backend(backend)
    if name == "auto":
        candidates = [n for n in ("cuda", "triton") if device.type == "cuda"] + ["torch"]
        for candidate in candidates:
            if _why_unavailable(candidate, device, dtype) is None and (
                    unsupported is None or unsupported(candidate) is None):
                return candidate
        raise AssertionError("the torch backend runs everything")
    reason = _why_unavailable(name, device, dtype)
    if reason is None and unsupported is not None:
        reason = unsupported(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} was requested but cannot run: {reason}")
    return name
