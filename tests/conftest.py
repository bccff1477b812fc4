"""Shared fixtures: which backends and dtypes this machine can test, and the test device.

On the CPU, the Triton backend runs through the interpreter (``make test`` sets
TRITON_INTERPRET=1), which has no bf16; on a GPU every backend runs every dtype.
"""

from __future__ import annotations

import pytest
import torch

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


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16; bf16 Triton runs on a GPU (make test-gpu)")


# atol per dtype for the STYLE.md pass rule (error <= 2 x plain-torch error + atol)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
