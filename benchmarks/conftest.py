"""``pytest benchmarks/ --benchmark`` times the suites; without the flag each case runs once at
tiny sizes as a correctness smoke (so ``make test`` covers it)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="time the benchmark suites at full size (default: tiny correctness smoke)")


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True


@pytest.fixture
def full_size(request) -> bool:
    return request.config.getoption("--benchmark")
