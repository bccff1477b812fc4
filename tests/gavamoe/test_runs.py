"""Files of a run written whole (gavamoe.runs.replacing)."""

import pytest

from gavamoe.runs import replacing


def test_replacing_swaps_in_the_new_file_and_leaves_no_scratch(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with replacing(path) as partial:
        partial.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_replacing_keeps_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), replacing(path) as partial:
        partial.write_text("half")
        raise RuntimeError("killed midway")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with pytest.raises(RuntimeError), replacing(tmp_path / "new.json") as partial:
        partial.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
