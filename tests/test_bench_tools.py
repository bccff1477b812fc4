"""The benchmark report and the GPU runbook's helpers, on synthetic inputs."""

from __future__ import annotations

import json

from benchmarks import report, runbook


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
