"""The README's Python examples run as written (each block in order, sharing one namespace)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "gk.route(hidden, gate_weight" not in b]  # the API summary is a signature list
    assert len(runnable) >= 2
    namespace: dict = {}
    for block in runnable:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (3, 10, 64)
    assert namespace["gen"].shape[0] == 2
    assert namespace["gamma"].shape == (10000, 4)
