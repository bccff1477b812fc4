"""python -m gavamoe.fame: the contracted files on synthetic data and on a .inter file, and bad
input as one line with exit status 2 before any training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gavamoe.errors import run_cli
from gavamoe.fame.__main__ import main

TINY = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "8", "--dim", "16",
        "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
KEYS = {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"}


def _inter(path: Path, header: list[str], rows) -> Path:
    """A RecBole atomic .inter file: the typed header and one tab-separated line per row."""
    path.write_text("\n".join("\t".join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("model", ["fame", "sasrec"])
def test_synthetic_run_writes_the_contracted_files(tmp_path, model):
    out = tmp_path / model
    assert main(["--out", str(out), "--model", model, *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == KEYS and set(metrics["validation"]) == KEYS
    assert set(metrics["popularity"]["test"]) == KEYS and set(metrics["oracle"]["test"]) == KEYS
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert all(0 <= v <= 1 for v in metrics["test"].values())
    assert metrics["config"]["model"]["model"] == model
    assert metrics["config"]["command"] == ["--out", str(out), "--model", model, *TINY]
    assert metrics["config"]["synthetic"] == dict(num_users=120, num_items=40, num_facets=2, values=4, length=8,
                                                  stick=0.8, noise=0.1, seed=0)
    assert (out / "loss_curve.png").stat().st_size > 0
    assert ((out / "gates.png").exists()) == (model == "fame")
    assert ("gate_sharpness" in metrics) == (model == "fame")
    if model == "fame":  # the default 2 heads of 4 experts; each figure between one-hot and uniform
        sharpness = metrics["gate_sharpness"]
        assert len(sharpness["experts"]) == 2
        for gate, size in [(sharpness["head_gate"], 2)] + [(e, 4) for e in sharpness["experts"]]:
            assert 0 <= gate["entropy"] <= 1 and 1 / size - 1e-6 <= gate["max_weight"] <= 1 + 1e-6
    assert ("head_gate_nmi" in metrics) == (model == "fame")


def test_without_a_terminal_training_reports_its_epochs_on_stderr(tmp_path, capsys, monkeypatch):
    """Under nohup or in a log there is no progress bar; a line per REPORT_SECONDS stands in for it."""
    monkeypatch.setattr("gavamoe.progress.REPORT_SECONDS", 0)
    assert main(["--out", str(tmp_path / "run"), *TINY]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fame: ")]
    assert [line.split(",")[0] for line in lines] == ["fame: 1/2", "fame: 2/2"], lines
    assert "loss=" in lines[0] and "val_ndcg10=" in lines[0] and "best=" in lines[0]


@pytest.mark.slow
def test_with_4000_users_the_head_gate_follows_the_planted_facet(tmp_path, one_thread):
    """The README's 4000-user run (about 3 minutes on one thread): FAME's head gate sends the users
    of each planted facet to their own head (NMI 0.92 there) and FAME reaches the planted-truth
    ranker (NDCG@10 0.1322 against 0.1312)."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--synthetic-users", "4000", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_gate_nmi"] > 0.5, metrics["head_gate_nmi"]
    assert metrics["test"]["ndcg@10"] > 0.95 * metrics["oracle"]["test"]["ndcg@10"], metrics["test"]


def test_a_model_not_above_popularity_is_a_warning(tmp_path):
    """Every user's validation target is the item most counted in training, so popularity ranks it
    first; one epoch at a rate too small to learn anything leaves the model below that, and the
    command says so (the file defaults did this to SASRec on MovieLens-100K, the README)."""
    rows = [(f"u{u}", item) for u in range(40)
            for item in (f"i{(u * 7) % 23}", "hot", f"i{(u * 7 + 1) % 23}", "hot", "hot")]
    path = _inter(tmp_path / "hot.inter", ["user_id:token", "item_id:token"], rows)
    with pytest.warns(RuntimeWarning, match="not above the popularity baseline's 1.0000"):
        main(["--out", str(tmp_path / "run"), "--data", str(path), "--dim", "16", "--epochs", "1", "--lr", "1e-9",
              "--device", "cpu"])


def test_inter_file_run(tmp_path):
    rows = [(f"u{u}", f"i{(u * 7 + t) % 23}", t) for u in range(40) for t in range(6)]
    path = _inter(tmp_path / "toy.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    out = tmp_path / "run"
    assert main(["--out", str(out), "--data", str(path), "--dim", "16", "--epochs", "1", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["users"] == 40 and metrics["items"] == 23
    assert "head_gate_nmi" not in metrics and "oracle" not in metrics  # no planted truth in a file
    assert metrics["config"]["data"] == str(path.resolve()) and "synthetic" not in metrics["config"]


def test_a_batch_without_a_training_target_is_skipped_not_a_nan(tmp_path):
    """A user with 3 items keeps all 3 for input, validation and test, and has no training target;
    a batch of only such users would make the loss NaN and every weight with it."""
    rows = [(f"u{u}", f"i{(u * 5 + t) % 17}", t) for u in range(12) for t in range(3 if u % 3 else 6)]
    path = _inter(tmp_path / "short.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    out = tmp_path / "run"
    assert main(["--out", str(out), "--data", str(path), "--dim", "16", "--epochs", "2", "--batch-size", "1",
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in metrics["history"]), metrics["history"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--dim", "30", "--num-heads", "4"], "--dim 30 must be a multiple of --num-heads 4"),
    (["--top-k", "5"], "--top-k must lie in [1, --num-experts=4], got 5"),
    (["--num-experts", "0"], "--num-experts must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--dropout", "1.5"], "--dropout must lie in [0, 1), got 1.5"),
    (["--data", "missing.inter"], "--data missing.inter: no such file"),
    (["--device", "tpu9"], "--device tpu9: not a device"),
    (["--synthetic-values", "1"], "--synthetic-values must be at least 2 (each user likes two values"),
    (["--synthetic-facets", "0"], "--synthetic-facets must be at least 1, got 0"),
    (["--synthetic-length", "2"], "--synthetic-length must be at least 3, got 2"),
    (["--seed", "-1"], "--seed must be non-negative, got -1"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
])
def test_bad_flags_are_one_line_before_any_work(capsys, tmp_path, flags, message):
    out = tmp_path / "run"
    assert run_cli("gavamoe.fame", main, ["--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gavamoe.fame: error: ") and message in err, err
    assert not out.exists()
