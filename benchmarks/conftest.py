"""``pytest benchmarks/ --benchmark`` times the suites at full size; each suite run writes
``benchmarks/results/<device>-<suite>.json`` (pytest-benchmark's rows, this run's environment and
measured rates), and the combined ``<device>.md`` / ``<device>.png`` are rewritten from every
suite file of that device (report.py). Without the flag each case runs once at tiny sizes as a
correctness smoke (so ``make test`` covers it). ``--results DIR`` writes elsewhere.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="time the benchmark suites at full size and write benchmarks/results/ "
                          "(default: tiny correctness smoke)")
    parser.addoption("--results", default=str(RESULTS), help="folder for the result files (benchmarks/results)")


def device_slug() -> str:
    from benchmarks.common import environment

    return re.sub(r"[^a-z0-9]+", "-", environment()["device"].lower()).strip("-")


def suite_of(fullname: str) -> str:
    """'benchmarks/bench_moe.py::test_x[...]' -> 'moe'."""
    match = re.search(r"bench_(\w+)\.py", fullname)
    return match.group(1) if match else "other"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
    elif not config.getoption("benchmark_json", None):
        # pytest-benchmark writes its session file here; the per-suite files are written below
        config.option.benchmark_json = Path(tempfile.mkdtemp(prefix="gavamoe-bench-")) / "session.json"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A run stopped midway (Ctrl-C, or the GPU runbook's deadline) keeps the rows it finished: the
    case cut off has no timings, and pytest-benchmark, whose own wrapper saves inside this one, would
    fail on it and save none."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [bench for bench in benchmark_session.benchmarks
                                           if getattr(getattr(bench, "stats", None), "data", None)]
    return (yield)


_SESSION_RATES: dict = {}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from benchmarks.common import environment
    from benchmarks.report import write_combined_report

    results = Path(config.getoption("--results"))
    results.mkdir(parents=True, exist_ok=True)
    slug = device_slug()
    by_suite: dict[str, list] = {}
    for bench in output_json["benchmarks"]:
        by_suite.setdefault(suite_of(bench["fullname"]), []).append(bench)
    for suite, rows in by_suite.items():
        path = results / f"{slug}-{suite}.json"
        path.write_text(json.dumps({**output_json, "benchmarks": rows,
                                    "gavamoe": {**environment(), "suite": suite, "rates": _SESSION_RATES}}, indent=1))
        print(f"\nbenchmarks: wrote {path}")
    for path in write_combined_report(results, slug):
        print(f"benchmarks: wrote {path}")


@pytest.fixture(scope="session")
def full_size(request) -> bool:
    return request.config.getoption("--benchmark")


@pytest.fixture(scope="session")
def rates(full_size):
    """The ceilings the traffic model predicts with, measured once in this run: a large matmul in
    the benchmark dtype, a large fp32 matmul (CUDA cores), and a device copy (read + write)."""
    from benchmarks.common import measure_rates

    measured = measure_rates(full_size)
    _SESSION_RATES.update(tensor_flops=measured.tensor_flops, fp32_flops=measured.fp32_flops,
                          copy_bytes=measured.copy_bytes, l2_bytes=measured.l2_bytes, sms=measured.sms)
    return measured
