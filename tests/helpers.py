"""Constants and small helpers shared by the tests: which backends and dtypes this machine can
test, the tolerances of the STYLE.md pass rule, and the input layouts every backend must take.

On the CPU the Triton backend runs through the interpreter (``make test`` sets
TRITON_INTERPRET=1), which has no bf16: that combination must be refused, and the grids check
that it is. On a GPU every backend runs every dtype.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels._backend import cuda_extension_built, triton_installed, triton_interpret

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends() -> list[str]:
    names = ["torch"]
    if triton_installed() and (DEVICE.type == "cuda" or triton_interpret()):
        names.append("triton")
    if DEVICE.type == "cuda" and cuda_extension_built():
        names.append("cuda")
    return names


BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# atol per dtype for the STYLE.md pass rule (error <= 2 x plain-torch error + atol)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}

# (T, H) layouts of a 2-D input: contiguous, transposed view, every other column, one row repeated
LAYOUTS = ["contiguous", "transposed", "strided", "stride0"]


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A 2-D tensor with ``t``'s shape in ``layout``; the same values except for "stride0", whose
    rows all repeat t's first row (an expand, stride 0 along dim 0)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "strided":
        wide = torch.empty((t.shape[0], 2 * t.shape[1]), device=t.device, dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "stride0":
        return t[:1].expand(t.shape)
    raise ValueError(layout)


def refused_here(backend: str, dtype: torch.dtype) -> bool:
    """The Triton interpreter has no bf16: the backend must refuse it (bf16 Triton runs on a GPU)."""
    return backend == "triton" and DEVICE.type == "cpu" and dtype == torch.bfloat16


@contextlib.contextmanager
def expect_refusal(backend: str, dtype: torch.dtype):
    """Run the block; where this machine cannot run (backend, dtype), it must raise a clear
    BackendUnavailableError instead of returning garbage. Yields True when it was refused."""
    if not refused_here(backend, dtype):
        yield False
        return
    with pytest.raises(gk.BackendUnavailableError, match="no bfloat16"):
        yield True


def child_env(*drop: str, **extra: str) -> dict[str, str]:
    """This process's environment for a child that must not think it is inside this pytest run
    (an xdist worker's ``PYTEST_*`` variables make a child pytest act as a worker too), without the
    variables ``drop`` and with ``extra`` set."""
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_")}
    return {**env, **extra}


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC -m gavamoe.train ARGS``,
    one thread per process; asserts that it exits 0 and returns it.

    Run once more, and only once, when a rank dies of SIGSEGV: gloo under FSDP2 on the CPU
    (torch 2.13.0+cpu) segfaulted once in CI, in rank 1 of the FSDP resume run of
    test_fsdp_trains_like_ddp_resumes_and_generates, and 40 local repeats of that run did not do it
    again. The repeat computes the same thing (these runs write a checkpoint only where they stop or
end, so a resumed repeat starts from the checkpoint the first try started from, or finds training
done), and it is reported as a warning; a second crash, or any other failure, fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "gavamoe.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and "(SIGSEGV)" in done.stderr:
        warnings.warn(f"a torchrun rank segfaulted; ran it once more: {' '.join(args)}", stacklevel=2)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
