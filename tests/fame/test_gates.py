"""python -m gavamoe.fame.gates: a finished run's gate sharpness, recomputed from its model, equals
what training wrote; what is not a FAME run with its data is one line and exit status 2, and the
run's files stay as they were."""

from __future__ import annotations

import json
import shutil

import pytest

from gavamoe.errors import run_cli
from gavamoe.fame.__main__ import main as train_main
from gavamoe.fame.gates import main

from .test_cli import TINY, _inter


def _strip(run):
    """The run as one made before gate_sharpness existed: no such key, no gates.png."""
    metrics = json.loads((run / "metrics.json").read_text())
    sharpness = metrics.pop("gate_sharpness")
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run / "gates.png").unlink()
    return metrics, sharpness


def _figures(sharpness) -> list[float]:
    return [gate[key] for gate in [sharpness["head_gate"], *sharpness["experts"]] for key in ("entropy", "max_weight")]


def _check_restored(run, before, sharpness):
    after = json.loads((run / "metrics.json").read_text())
    assert _figures(after.pop("gate_sharpness")) == pytest.approx(_figures(sharpness), abs=1e-6)
    assert after == before  # nothing else touched
    assert (run / "gates.png").stat().st_size > 0


def test_gates_of_a_synthetic_run_equal_what_training_wrote(tmp_path):
    run = tmp_path / "run"
    assert train_main(["--out", str(run), *TINY]) == 0
    before, sharpness = _strip(run)
    assert main([str(run)]) == 0
    _check_restored(run, before, sharpness)


def test_gates_of_an_inter_run_read_the_file_or_its_new_place(tmp_path):
    rows = [(f"u{u}", f"i{(u * 7 + t) % 23}", t) for u in range(40) for t in range(6)]
    path = _inter(tmp_path / "toy.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    run = tmp_path / "run"
    assert train_main(["--out", str(run), "--data", str(path), "--dim", "16", "--epochs", "2", "--device",
                       "cpu"]) == 0
    before, sharpness = _strip(run)
    assert main([str(run)]) == 0
    _check_restored(run, before, sharpness)
    moved = shutil.move(path, tmp_path / "moved.inter")
    _strip(run)
    assert main([str(run), "--data", str(moved)]) == 0
    _check_restored(run, before, sharpness)


def _bad_runs(tmp_path):
    """(run, extra flags, message) of every refusal."""
    fame, sasrec = tmp_path / "fame", tmp_path / "sasrec"
    assert train_main(["--out", str(fame), *TINY]) == 0
    assert train_main(["--out", str(sasrec), "--model", "sasrec", *TINY]) == 0
    old = tmp_path / "old"
    shutil.copytree(fame, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["config"]["synthetic"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    other = _inter(tmp_path / "other.inter", ["user_id:token", "item_id:token"],
                   [(f"u{u}", f"i{t}") for u in range(5) for t in range(4)])
    return [(tmp_path / "nothing", [], "not found"),
            (sasrec, [], "is a sasrec run: only FAME has gates"),
            (old, [], "records no parameters of its planted data"),
            (fame, ["--data", str(other)], "the data have 5 users and 4 items, the run 120 and 40")]


def test_what_is_not_a_fame_run_with_its_data_is_one_line(tmp_path, capsys):
    for run, flags, message in _bad_runs(tmp_path):
        files = {p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else {}
        capsys.readouterr()
        assert run_cli("gavamoe.fame.gates", main, [str(run), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("gavamoe.fame.gates: error: ") and message in err, err
        assert files == ({p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else {})
