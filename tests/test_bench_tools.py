"""The benchmark report and the GPU runbook's helpers, on synthetic inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import report, runbook
from tests.helpers import child_env


def _row(case, impl, role, seconds, checked=True, **extra):
    info = dict(case=case, impl=impl, role=role, flops=1e12, bytes=None, checked=checked, call_seconds=seconds, **extra)
    return {"fullname": f"benchmarks/bench_moe.py::test[{impl}]", "extra_info": info}


def test_report_compares_only_checked_rows_and_shows_predictions(tmp_path):
    run = {"datetime": "now", "gavamoe": {"device": "Test GPU", "suite": "moe", "rates": {}},
           "benchmarks": [
               _row("case A", "gavamoe-triton", "ours", [1.0, 1.2, 0.9], prediction={"seconds": 0.5}),
               _row("case A", "peer-good", "peer", [2.0]),
               _row("case A", "peer-wrong", "peer", [0.5], checked=False, check="y: error 1.0e+00 (allowed 1.0e-03)"),
               _row("case A", "dense matmul", "limit", [0.8]),
               _row("case A", "compiled", "peer", [3.0], compiles=1, fell_back_to_eager="Unsupported: x"),
               _row("case A", "compiled-ok", "peer", [2.5], compiles=0, fell_back_to_eager=None),
           ]}
    text = report.markdown([run])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 2.00x |" in lines["peer-good"]  # 2.0 / median 1.0
    assert "x |" not in lines["peer-wrong"].split("|")[10] and "failed the check" in lines["peer-wrong"]
    assert "500.000 ms" in lines["gavamoe-triton"] and "| 2.00 |" in lines["gavamoe-triton"]  # predicted, ratio
    assert "| 80 |" in lines["gavamoe-triton"]  # 0.8 s of the dense matmul over 1.0 s
    assert "fell back to eager" in lines["compiled"] and "compiled (" not in lines["compiled"]
    assert "compiled (graph reused)" in lines["compiled-ok"]
    (tmp_path / "test-gpu-moe.json").write_text(json.dumps(run))
    md, png = report.write_combined_report(tmp_path, "test-gpu")
    assert md.read_text() == text and png.stat().st_size > 0


def test_runbook_reads_failures_and_the_final_line(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.a" name="ok"/>'
                     '<testcase classname="tests.b" name="bad"><failure message="AssertionError: 1 != 2">'
                     'line one\nline two</failure></testcase></testsuite></testsuites>')
    found = runbook.failures(junit)
    assert len(found) == 1 and found[0].startswith("tests.b::bad [failure]") and "1 != 2" in found[0]
    assert runbook.failures(tmp_path / "missing.xml")[0].startswith("(no junit report")
    log = tmp_path / "log"
    log.write_text("....\n=========== 3 passed, 1 failed, 2 skipped in 4.20s ===========\n")
    assert runbook.final_line(log) == "3 passed, 1 failed, 2 skipped in 4.20s"


def test_runbook_refuses_to_run_on_a_machine_without_cuda_unless_dry(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert runbook.main(["bench", "--suite", "router"]) == 2
    assert "use --dry-run" in capsys.readouterr().err


def test_runbook_stops_a_command_at_its_deadline_and_kills_one_that_ignores_ctrl_c(monkeypatch):
    # started with Ctrl-C ignored (a background job, a pytest-xdist worker), the command still gets it
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.time()
        code = runbook._run([sys.executable, "-c", "import time; time.sleep(60)"], deadline=start + 1)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert code not in (0, -9) and time.time() - start < 20  # Ctrl-C stopped it, not the kill
    monkeypatch.setattr(runbook, "GRACE_S", 1.0)
    start = time.time()
    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    assert runbook._run([sys.executable, "-c", deaf], deadline=start + 1) == -9
    assert time.time() - start < 20


def _fake_steps(monkeypatch, calls):
    """install, check and bench stand-ins: the last two write a result file each, and the first check
    runs until the deadline, so that a session's budget can be spent without pip or pytest."""

    def check(results, dry_run, deadline=None, installed=None):
        assert installed == 0  # the session installed first
        calls.append("check")
        (results / f"{runbook._slug()}-tests.txt").write_text("tests\n")
        if calls.count("check") == 1 and deadline is not None:
            time.sleep(max(deadline - time.time(), 0) + 0.05)
        return 1

    def bench(suite, results, dry_run, select=None, deadline=None):
        calls.append(suite)
        (results / f"{runbook._slug()}-{suite}.json").write_text("{}")
        return 0

    monkeypatch.setattr(runbook, "install", lambda deadline=None: 0)
    monkeypatch.setattr(runbook, "check", check)
    monkeypatch.setattr(runbook, "bench", bench)


def test_runbook_session_runs_its_steps_in_order_until_the_deadline_and_packs_after_each(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    monkeypatch.setattr(runbook, "MIN_STEP_S", 0.5)
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    # the first check runs to the deadline: the suites after it are not reached
    assert runbook.main(["session", "--dry-run", "--results", str(results), "--out", str(out),
                         "--budget-s", "1", "--steps", "check,moe"]) == 1
    assert calls == ["check"]
    slug = runbook._slug()
    session = (results / f"{slug}-session.txt").read_text()
    assert "check: exit 1" in session and "stopped at the deadline" in session and "moe: not reached" in session
    with tarfile.open(out / runbook.PACKED) as tar:
        assert sorted(tar.getnames()) == [f"{slug}-session.txt", f"{slug}-tests.txt"]
    # with time enough every step runs, in the order given
    assert runbook.main(["session", "--dry-run", "--results", str(results), "--out", str(out),
                         "--budget-s", "100", "--steps", "router,check,moe"]) == 1
    assert calls == ["check", "router", "check", "moe"]
    with tarfile.open(out / runbook.PACKED) as tar:
        assert {f"{slug}-router.json", f"{slug}-moe.json", f"{slug}-tests.txt"} <= set(tar.getnames())
    assert "not reached" not in (results / f"{slug}-session.txt").read_text()


def test_the_session_file_says_what_became_of_the_carried_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(runbook, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", "before")
    assert runbook._install_wheels() == "wheels: none carried in .whl/"
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "broken-1.0-py3-none-any.whl").write_text("not a zip file")
    line = runbook._install_wheels()
    assert line.startswith("wheels: pip exit ") and "broken-1.0-py3-none-any.whl" in line and "not on the path" in line
    assert os.environ["PYTHONPATH"] == "before"
    calls: list[str] = []
    _fake_steps(monkeypatch, calls)
    results, out = tmp_path / "results", tmp_path / "out"
    runbook.main(["session", "--dry-run", "--results", str(results), "--out", str(out), "--budget-s", "100",
                  "--steps", "moe"])
    assert "wheels: pip exit" in (results / f"{runbook._slug()}-session.txt").read_text()


def test_runbook_session_refuses_unknown_steps_and_a_budget_of_nothing(tmp_path, capsys):
    for bad in (["--steps", "check,moe,nope"], ["--steps", ","], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as stop:
            runbook.main(["session", "--dry-run", "--out", str(tmp_path), *bad])
        assert stop.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_interrupted_benchmark_run_keeps_the_rows_it_finished(tmp_path):
    """Ctrl-C (the runbook's deadline) in the third of four cases: the first two are saved."""
    (tmp_path / "bench_toy.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_toy(benchmark, i):\n"
        "    def work():\n"
        "        if i == 2:\n"
        "            raise KeyboardInterrupt\n"
        "        return sum(range(100))\n"
        "    benchmark.extra_info.update(case='toy', impl=f'impl{i}', role='ours', checked=True)\n"
        "    benchmark.pedantic(work, rounds=3)\n")
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.conftest",
                           str(tmp_path / "bench_toy.py"), "--benchmark", f"--results={results}",
                           f"--rootdir={tmp_path}"], cwd=runbook.ROOT, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(runbook.ROOT)))  # not as an xdist worker: that one saves nothing
    assert proc.returncode == 2, proc.stdout[-2000:]  # interrupted
    saved = json.loads((results / f"{runbook._slug()}-toy.json").read_text())
    assert [row["extra_info"]["impl"] for row in saved["benchmarks"]] == ["impl0", "impl1"]
