"""Fixtures for every test: outputs poisoned with NaN before any kernel runs, and the gpu marker.

Shared constants (backends, dtypes, tolerances, layouts) live in tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch

from gavamoe_kernels.testing import poisoned_empty


def pytest_collection_modifyitems(config, items):
    # The slow model runs first: make test hands the first tests out to its processes in turn
    # (pytest-xdist's load scheduling), so the long runs are spread over them.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floats and
    INT_POISON-filled integers, so that an output element a kernel forgets to write fails."""
    with poisoned_empty():
        yield


@pytest.fixture
def device() -> torch.device:
    from tests.helpers import DEVICE

    return DEVICE


@pytest.fixture
def one_thread():
    """One torch thread, as the README's CPU runs of the models (one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
