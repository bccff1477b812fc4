"""``pytest benchmarks/ --benchmark`` times the suites at full size and writes
``benchmarks/results/<device>.json`` with its markdown summary and PNG chart (report.py);
without the flag each case runs once at tiny sizes as a correctness smoke (so ``make test``
covers it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="time the benchmark suites at full size and write benchmarks/results/ "
                          "(default: tiny correctness smoke)")


def result_path() -> Path:
    from benchmarks.common import environment

    slug = re.sub(r"[^a-z0-9]+", "-", environment()["device"].lower()).strip("-")
    return RESULTS / f"{slug}.json"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
    elif not config.getoption("benchmark_json", None):
        RESULTS.mkdir(exist_ok=True)
        config.option.benchmark_json = result_path()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from benchmarks.common import environment
    from benchmarks.report import write_report

    output_json["gavamoe"] = environment()
    for path in write_report(output_json, Path(config.getoption("benchmark_json"))):
        print(f"\nbenchmarks: wrote {path}")


@pytest.fixture
def full_size(request) -> bool:
    return request.config.getoption("--benchmark")
