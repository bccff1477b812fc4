"""python -m gavamoe.fame.compare: every variant over every seed, and the spread computed from the
runs' own metrics."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from gavamoe.errors import run_cli
from gavamoe.fame import compare
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
    fame = [json.loads((tmp_path / f"fame-seed{s}" / "metrics.json").read_text()) for s in range(2)]
    assert summary["fame"]["expert_entropy"]["values"] == pytest.approx(
        [statistics.mean(e["entropy"] for e in m["gate_sharpness"]["experts"]) for m in fame])
    assert "expert_entropy" not in summary["fame, 1 expert"]  # one expert: no choice to measure
    assert "expert_entropy" not in summary["sasrec"]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| ") == 6  # header and five rows
    assert (tmp_path / "comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_the_same_command_again_reuses_the_runs_finished_with_the_same_flags(tmp_path, monkeypatch):
    """A comparison cut short resumes: only the runs without metrics, or with other flags, train again."""
    argv = ["--out", str(tmp_path), "--seeds", "2", *TINY]
    assert main(argv) == 0
    first = json.loads((tmp_path / "comparison.json").read_text())
    (tmp_path / "sasrec-seed1" / "metrics.json").unlink()  # cut short during this run
    other = tmp_path / "fame-seed0" / "metrics.json"  # a run of an earlier command with other flags
    metrics = json.loads(other.read_text())
    metrics["config"]["command"] += ["--dropout", "0.1"]
    metrics["test"]["ndcg@10"] = -1.0
    other.write_text(json.dumps(metrics))
    trained = []
    train = compare.fame_cli.main
    monkeypatch.setattr(compare.fame_cli, "main", lambda a: trained.append(Path(a[1]).name) or train(a))
    assert main(argv) == 0
    assert sorted(trained) == ["fame-seed0", "sasrec-seed1"]
    assert json.loads((tmp_path / "comparison.json").read_text()) == first  # the same seeds train the same


@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", "1"], "--seeds must be at least 2"),
    (["--model", "sasrec"], "set by the comparison"),
    # flags in full only: argparse read --seed as an abbreviation of --seeds, and --num-exp went to
    # gavamoe.fame as --num-experts, after the variant's own
    (["--seed", "3"], "set by the comparison"),
    (["--num-exp", "2"], "unrecognized arguments: --num-exp 2"),
])
def test_bad_flags(capsys, tmp_path, flags, message):
    try:
        status = run_cli("gavamoe.fame.compare", main, ["--out", str(tmp_path / "c"), *flags])
    except SystemExit as exit:  # what argparse refuses exits from the parser
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
