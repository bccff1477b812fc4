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
import importlib.util
import os
import sys
import threading

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
def use_backend(name: str):
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


def _why_unavailable(name: str, device: torch.device) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        if not triton_installed():
            return "the triton package is not installed (pip install 'gavamoe[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            kernels = sys.modules.get("gavamoe_kernels.moe.routing")
            if kernels is not None and not kernels.INTERPRET:
                return ("TRITON_INTERPRET=1 was set after the Triton kernels were first loaded; "
                        "set it before the first call")
            return None
        return (
            f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the "
            f"first call; got tensors on {device}"
        )
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors; got tensors on {device}"
        if not cuda_extension_built():
            return (
                "the CUDA extension gavamoe_kernels._C is not built "
                "(pip install --no-build-isolation . on a machine with nvcc and a CUDA torch; see csrc/README.md)"
            )
        if not triton_installed():
            return "the cuda backend runs its backward passes and the expert GEMMs on Triton, which is not installed"
        return None
    raise AssertionError(name)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Pick the backend for tensors on ``device``. Automatic choice takes "cuda" only with
    Triton installed too: the cuda backend runs its backward passes and the expert GEMMs on Triton."""
    name = requested_backend(backend)
    if name == "auto":
        if device.type == "cuda" and cuda_extension_built() and triton_installed():
            return "cuda"
        if device.type == "cuda" and triton_installed():
            return "triton"
        return "torch"
    reason = _why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} was requested but cannot run: {reason}")
    return name
