"""gavamoe.progress: without a terminal (pytest captures stderr, so there is none here) a long
loop reports on stderr at most once every REPORT_SECONDS; quiet bars say nothing."""

from __future__ import annotations

import pytest

from gavamoe import progress
from gavamoe.progress import Progress


def _lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_each_step_reports_count_total_and_postfix_when_the_interval_is_zero(capsys, monkeypatch):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0)
    bar = Progress(range(3), desc="epoch")
    for i in bar:
        bar.set_postfix(loss=f"{i / 4:.2f}", ndcg="0.1")
    bar.close()
    lines = _lines(capsys)
    assert [line.split(" (")[0] for line in lines] == [
        "epoch: 1/3, loss=0.00, ndcg=0.1", "epoch: 2/3, loss=0.25, ndcg=0.1", "epoch: 3/3, loss=0.50, ndcg=0.1"], lines
    assert all(line.endswith(" s)") for line in lines)


def test_update_counts_from_initial_and_a_total_may_be_unknown(capsys, monkeypatch):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0)
    bar = Progress(total=10, initial=4, desc="stage 2")
    bar.update(3)
    open_ended = Progress(iter("ab"), desc="generate")
    list(open_ended)
    assert [line.split(" (")[0] for line in _lines(capsys)] == ["stage 2: 7/10", "generate: 1", "generate: 2"]


def test_reports_are_at_most_one_per_interval_across_bars(capsys, monkeypatch):
    monkeypatch.setattr(progress, "REPORT_SECONDS", 3600)
    monkeypatch.setattr(progress, "_last_report", progress.time.perf_counter())
    for epoch in range(3):
        list(Progress(range(50), desc=f"epoch {epoch}"))
    assert _lines(capsys) == []
    monkeypatch.setattr(progress, "_last_report", progress.time.perf_counter() - 3600)
    list(Progress(range(50), desc="late"))
    assert [line.split(" (")[0] for line in _lines(capsys)] == ["late: 1/50"]


@pytest.mark.parametrize("interval", [0, 3600])
def test_a_quiet_bar_says_nothing_and_still_yields_everything(capsys, monkeypatch, interval):
    monkeypatch.setattr(progress, "REPORT_SECONDS", interval)
    bar = Progress(range(4), desc="rank 1", quiet=True)
    assert list(bar) == [0, 1, 2, 3]
    bar.update()
    bar.close()
    assert _lines(capsys) == []
