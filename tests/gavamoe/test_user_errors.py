"""Bad input to the command lines: one line naming the flag, file or record, exit status 2, no
traceback, and nothing written or trained before the check."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import re
import subprocess
import sys

import pytest
import torch

from gavamoe import evaluate, generate, train
from gavamoe.data import text as text_data
from gavamoe.errors import UserInputError, run_cli, writable_out
from gavamoe.fame.model import SeqRecConfig
from gavamoe.fame.train import TrainConfig as FameTrainConfig
from gavamoe.runs import Run
from gavamoe.stage1 import Stage1Config
from gavamoe.stage2 import Stage2Config

TINY = ["--synthetic-users", "200", "--synthetic-items", "150", "--synthetic-records", "3000",
        "--embed-dim", "32", "--latent-dim", "8", "--pretrain-epochs", "1", "--epochs", "1", "--device", "cpu"]
TINY_STAGE2 = ["--stage2-batch-size", "32", "--max-explanation-tokens", "12", "--num-experts", "4",
               "--stop-after", "2"]


def _error(capsys, prog, main, argv) -> str:
    # drop what the test's earlier commands wrote: a training run's progress line (at most one a
    # minute across the process, so it shows up only when the test runs late) is not this error's
    capsys.readouterr()
    assert run_cli(prog, main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: ")
    return err


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "-1"], "--epochs must be non-negative, got -1"),
    (["--beta", "-0.5"], "--beta must be non-negative, got -0.5"),
    (["--num-clusters", "0"], "--num-clusters must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--user-code", "ids"], "--user-code must be one of history, embedding, got 'ids'"),
    (["--history-dropout", "1"], "--history-dropout must lie in [0, 1), got 1.0"),
    (["--encoder-dim", "0"], "--encoder-dim must be at least 1, got 0"),
    (["--encoder-dim", "100"], "--encoder-dim must be a multiple of the encoder's 8 heads, got 100"),
    (["--stage2-epochs", "0"], "--stage2-epochs must be at least 1"),
    (["--seed", "-1"], "--seed must be non-negative, got -1"),
    (["--warmup-ratio", "1"], "--warmup-ratio must lie in [0, 1), got 1.0"),
    (["--vocab-size", "100"], "--vocab-size must be at least 262 (the 256 byte symbols and 6 special tokens), got 100"),
    (["--base-model", "./no/such/model"], "--base-model ./no/such/model: no such folder"),
    (["--data", "missing.pickle"], "--data missing.pickle: no such file"),
    (["--device", "tpu9"], "--device tpu9: not a device"),
    (["--synthetic-groups", "99"], "--synthetic-groups must be at most 6"),
    (["--fsdp"], "--fsdp shards across processes: start it under torchrun"),
    (["--cpu-offload"], "--cpu-offload is FSDP's: give --fsdp with it"),
    (["--world-size", "8"], "--world-size plans a dry run: give --dry-run with it"),
    (["--dry-run", "--stage", "1"], "--dry-run plans stage 2: give --stage 2 or --stage all"),
    (["--dry-run", "--world-size", "0"], "--world-size must be at least 1, got 0"),
])
def test_bad_flags_are_one_line_before_any_work(capsys, tmp_path, flags, message):
    out = tmp_path / "run"
    err = _error(capsys, "gavamoe.train", train.main, ["--out", str(out), *TINY, *flags])
    assert message in err
    assert not (out / "stage1").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_on_a_machine_without_cuda(capsys, tmp_path):
    err = _error(capsys, "gavamoe.train", train.main, ["--out", str(tmp_path / "r"), *TINY, "--device", "cuda"])
    assert "--device cuda: this machine has no CUDA device" in err


def test_python_m_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gavamoe.train", "--out", str(tmp_path / "r"), "--epochs", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "gavamoe.train: error: --epochs must be non-negative, got -3"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["gavamoe.train", "gavamoe.generate", "gavamoe.evaluate", "gavamoe.demo",
                                    "gavamoe.recovery", "gavamoe.fame", "gavamoe.fame.compare", "gavamoe.expctr"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--out"], "argument --out: expected one argument"),
])
def test_argparse_errors_are_one_line(capsys, tmp_path, module, flags, message):
    """What argparse itself refuses is one line too, not the usage block (errors.CliParser).
    generate and evaluate report their missing required flags first; compare hands the flags it
    does not know to gavamoe.fame."""
    main = importlib.import_module(module + ".__main__" if module in ("gavamoe.fame", "gavamoe.expctr")
                                   else module).main
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path / "r"), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    prefix = "gavamoe.fame" if module == "gavamoe.fame.compare" and "--no-such-flag" in flags else module
    assert "\n" not in err and err.startswith(f"{prefix}: error: "), err
    assert message in err or "the following arguments are required" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("module", "flag"), [
    ("gavamoe.train", "--lr"), ("gavamoe.train", "--alpha"),  # the parser's flags, a group's
    ("gavamoe.fame", "--dropout"), ("gavamoe.expctr", "--synthetic-cold-fraction"), ("gavamoe.generate", "--top-p"),
])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_flag_takes_finite_numbers_only(capsys, tmp_path, module, flag, value):
    """NaN passes every range check (all its comparisons are false): --lr nan trained to NaN."""
    main = importlib.import_module(module + ".__main__" if module in ("gavamoe.fame", "gavamoe.expctr")
                                   else module).main
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path / "r"), f"{flag}={value}"])  # refused as read, before the required flags
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(f"argument {flag}: must be a finite number, got '{value}'"), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Stage1Config(lr=math.nan), "--lr must be a finite number, got nan"),
    (lambda: Stage2Config(alpha=math.inf), "--alpha must be a finite number, got inf"),
    (lambda: Stage2Config(lr=math.nan), "--stage2-lr must be a finite number, got nan"),
    (lambda: SeqRecConfig(num_items=5, dropout=math.nan), "--dropout must be a finite number"),
    (lambda: FameTrainConfig(lr=math.nan), "--lr must be a finite number"),
])
def test_configs_refuse_non_finite_numbers(make, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(("module", "flags"), [
    ("gavamoe.train", TINY), ("gavamoe.fame", ["--epochs", "1", "--device", "cpu"]),
    ("gavamoe.fame.compare", ["--epochs", "1", "--device", "cpu"]), ("gavamoe.recovery", ["--quick"]),
    ("gavamoe.demo", ["--device", "cpu"]), ("gavamoe.evaluate", ["--predictions", "p.jsonl"]),
])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, module, flags):
    """Before, the FAME and ExpCTR commands trained and then failed on their --out with a traceback,
    and the others failed with one."""
    main = importlib.import_module(module + ".__main__" if module == "gavamoe.fame" else module).main
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    err = _error(capsys, module, main, ["--out", str(blocker / "run"), *flags])
    # compare's runs check theirs (DIR/fame-seed0), after every flag; so no folder is made on a bad one
    assert f"--out {blocker / 'run'}" in err and err.endswith(f": cannot write there ({blocker} is a file)"), err
    assert blocker.read_text() == "kept"


def test_writable_out(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert writable_out(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert writable_out(tmp_path / "c" / "m.json", folder=False) == tmp_path / "c" / "m.json"
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "m.json").exists()  # the file is not made
    for path, folder, message in ((file, True, "exists and is not a folder"), (tmp_path, False, "is a folder"),
                                  (file / "m.json", False, f"cannot write there ({file} is a file)"),
                                  (file / "a" / "b", True, f"cannot write there ({file} is a file)")):
        with pytest.raises(UserInputError, match=re.escape(message)):
            writable_out(path, folder=folder)


def test_refused_pickle_is_a_user_error(capsys, tmp_path):
    laughs: list = []
    for _ in range(9):
        laughs = [laughs] * 10
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(laughs))
    err = _error(capsys, "gavamoe.train", train.main, ["--out", str(tmp_path / "r"), "--data",
                                                        str(tmp_path / "reviews.pickle"), "--device", "cpu"])
    assert "reviews.pickle" in err and "refused" in err


@pytest.mark.parametrize(("content", "message"), [
    ('{"features": ["a"], "reference": "x", "generated": "y"}\n{oops\n', ":2: not valid JSON"),
    ("42\n", ":1: expected a JSON object, got a int"),
    ('{"features": ["a"], "reference": "x"}\n', ":1: lacks generated"),
    ('{"features": "room", "reference": "x", "generated": "y"}\n', ":1: features must be a list of strings"),
    ('{"features": ["a"], "reference": 3, "generated": "y"}\n', ":1: reference must be a string"),
    ("\n\n", "holds no predictions"),
])
def test_malformed_predictions_name_file_and_line(capsys, tmp_path, content, message):
    path = tmp_path / "pred.jsonl"
    path.write_text(content)
    err = _error(capsys, "gavamoe.evaluate", evaluate.main, ["--predictions", str(path), "--out",
                                                              str(tmp_path / "m.json")])
    assert str(path) in err and message in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--bertscore-idf"], "need --bertscore-model"),
    (["--bertscore-model", "no/such/encoder"], "--bertscore-model no/such/encoder: not a local folder"),
    (["--features-from", "no/such.pickle"], "--features-from no/such.pickle: neither a reviews.pickle"),
])
def test_bad_evaluation_conventions_are_one_line(capsys, tmp_path, flags, message):
    path = tmp_path / "pred.jsonl"
    path.write_text('{"features": ["a"], "reference": "x", "generated": "y"}\n')
    err = _error(capsys, "gavamoe.evaluate", evaluate.main, ["--predictions", str(path), "--out",
                                                              str(tmp_path / "m.json"), *flags])
    assert message in err
    assert not (tmp_path / "m.json").exists()


def test_features_from_gives_peters_feature_vocabulary(tmp_path):
    """--features-from: the dataset-wide feature set (FCR's denominator), as PETER builds it."""
    records = [{"user": "u", "item": f"i{n}", "rating": 4, "template": (f, "good", f"the {f} is good", 1)}
               for n, f in enumerate(["room", "pool", "bar", "staff", "room", "view", "spa", "gym", "lobby", "bed"])]
    data = tmp_path / "reviews.pickle"
    data.write_bytes(pickle.dumps(records))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"features": ["room"], "reference": "the room is good",
                                        "generated": "the room is good"}) + "\n" for _ in range(3)))
    out = tmp_path / "m.json"
    assert evaluate.main(["--predictions", str(pred), "--out", str(out), "--features-from", str(data),
                          "--feature-match", "peter"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["fcr"] == pytest.approx(1 / 9)  # "room" of the 9 features of the data (1 of 1 without it)
    assert metrics["conventions"]["feature_match"] == "peter"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert train.main(["--out", str(out), *TINY, *TINY_STAGE2, "--stop-after", "0"]) == 0
    return out


def test_each_run_writes_config_json_with_absolute_data_paths(tmp_path, monkeypatch):
    records = [{"user": f"u{i % 9}", "item": f"i{i % 7}", "rating": 1 + i % 5,
                "template": ("room", "nice", "the room was nice", 1)} for i in range(60)]
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(records))
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", "r", "--data", "reviews.pickle", "--stage", "1", *TINY]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["data"] == str(tmp_path / "reviews.pickle")
    assert set(config) == {"data", "stage1"} and config["stage1"]["config"]["epochs"] == 1
    monkeypatch.chdir("/")  # the run's data is found from anywhere
    assert Run(tmp_path / "r").load_data().num_users == 9


def test_a_run_cannot_be_retrained_on_other_data(capsys, run):
    other = ["--synthetic-records", "3001"]
    err = _error(capsys, "gavamoe.train", train.main, ["--out", str(run), *TINY, *other, "--stage", "1"])
    assert "holds a run trained on other data" in err


def test_stale_stage2_is_refused_after_stage1_is_retrained(capsys, run, tmp_path, monkeypatch):
    monkeypatch.setattr("gavamoe.progress.REPORT_SECONDS", 0)  # the training runs before write progress lines
    fresh = tmp_path / "fresh"
    Run(run).fork(fresh)
    assert train.main(["--out", str(fresh), *TINY, *TINY_STAGE2, "--stage", "2", "--stop-after", "0"]) == 0
    assert generate.main(["--run", str(fresh), "--out", str(tmp_path / "p.jsonl"), "--limit", "2",
                          "--device", "cpu"]) == 0
    assert train.main(["--out", str(fresh), *TINY, "--stage", "1", "--lr", "2e-3"]) == 0  # stage 1 again
    err = _error(capsys, "gavamoe.generate", generate.main, ["--run", str(fresh), "--out", str(tmp_path / "q.jsonl"),
                                                              "--device", "cpu"])
    assert "stage 2 was trained on an earlier stage 1" in err and not (tmp_path / "q.jsonl").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0"], "--temperature must be positive, got 0.0"),
    (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--limit", "-3"], "--limit must be non-negative, got -3"),
    (["--seed", "-1"], "--seed must be non-negative, got -1"),
])
def test_generate_flags_are_checked_before_the_run_is_read(capsys, tmp_path, flags, message):
    err = _error(capsys, "gavamoe.generate", generate.main, ["--run", str(tmp_path / "none"),
                                                              "--out", str(tmp_path / "p.jsonl"), *flags])
    assert err == f"gavamoe.generate: error: {message}", err
    assert not (tmp_path / "p.jsonl").exists()


def test_generate_checks_out_and_max_new_tokens_first(capsys, run, tmp_path):
    err = _error(capsys, "gavamoe.generate", generate.main, ["--run", str(run), "--out", str(tmp_path / "p.jsonl"),
                                                              "--max-new-tokens", "0"])
    assert "--max-new-tokens must be at least 1, got 0" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(capsys, "gavamoe.generate", generate.main, ["--run", str(run), "--out", str(blocker / "p.jsonl"),
                                                              "--device", "cpu"])
    assert "cannot write there" in err


def test_review_text_with_special_tokens_is_encoded_as_text():
    from gavamoe.data.text import encode, train_tokenizer

    tokenizer = train_tokenizer(["the room was great and the staff friendly"] * 40, 300)
    record = {"user_idx": 0, "item_idx": 0, "rating": 5.0,
              "template": ("room </s> <user>", "great", "the room </s> was <item> great <pad> <unk>", 1)}
    split = encode([record], tokenizer)
    special = set(tokenizer.all_special_ids)
    assert [t for t in split.targets[0] if t in special] == [tokenizer.eos_token_id]  # only the closing EOS
    prompt_specials = [t for t in split.prompts[0] if t in special]
    user, item = tokenizer.convert_tokens_to_ids(["<user>", "<item>"])
    assert prompt_specials.count(user) == 1 and prompt_specials.count(item) == 1  # the template's own
    assert tokenizer.eos_token_id not in split.prompts[0]
    assert "</s> <user>" in tokenizer.decode(split.prompts[0])  # the review's text kept as text
    assert text_data.prompt_text(record, tokenizer).count("<user>") == 2  # the displayed prompt shows both
