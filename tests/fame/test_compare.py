"""python -m gavamoe.fame.compare: every variant over every seed, and the spread computed from the
runs' own metrics."""

from __future__ import annotations

import json
import statistics

import pytest

from gavamoe.errors import run_cli
from gavamoe.fame.compare import main

TINY = ["--synthetic-users", "150", "--synthetic-items", "30", "--synthetic-length", "8", "--dim", "16",
        "--epochs", "3", "--batch-size", "32", "--device", "cpu"]


@pytest.mark.slow
def test_comparison_summarises_every_run(tmp_path):
    assert main(["--out", str(tmp_path), "--seeds", "2", *TINY]) == 0
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert set(summary) == {"fame", "sasrec", "fame, 1 expert", "popularity", "oracle (planted truth)"}
    for name, folder in (("fame", "fame"), ("sasrec", "sasrec"), ("fame, 1 expert", "fame-1expert")):
        runs = [json.loads((tmp_path / f"{folder}-seed{s}" / "metrics.json").read_text()) for s in range(2)]
        values = [r["test"]["ndcg@10"] for r in runs]
        assert summary[name]["ndcg@10"]["values"] == values
        assert summary[name]["ndcg@10"]["std"] == pytest.approx(statistics.stdev(values))
    assert runs[0]["config"]["model"]["num_experts"] == 1
    assert "head_gate_nmi" in summary["fame"] and "head_gate_nmi" not in summary["sasrec"]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| ") == 6  # header and five rows


@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", "1"], "--seeds must be at least 2"),
    (["--model", "sasrec"], "set by the comparison"),
])
def test_bad_flags(capsys, tmp_path, flags, message):
    assert run_cli("gavamoe.fame.compare", main, ["--out", str(tmp_path / "c"), *flags]) == 2
    assert message in capsys.readouterr().err
