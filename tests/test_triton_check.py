"""benchmarks/triton_check.py on toy kernels: launches recorded, compiled for sm_90 without a GPU,
and what fails the check. Compiling needs the kernels compiled, not interpreted, and the suite
runs under the interpreter on the CPU, so the tool runs in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import triton_check as tc
from gavamoe_kernels._backend import triton_installed
from tests.helpers import child_env

pytestmark = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
ROOT = Path(__file__).resolve().parents[1]

TOY = '''
import triton
import triton.language as tl

from gavamoe_kernels._triton import tuned


@triton.jit
def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2, mask=o < n)


@triton.jit
def early_return_kernel(x_ptr, n, WIDE: tl.constexpr):
    """The router's pattern before its fix: the compiler goes on past the return."""
    if WIDE:
        rows = x_ptr + tl.arange(0, 64)
        tl.store(rows, tl.load(rows) + 1)
        return
    if tl.program_id(0) < n:
        rows = x_ptr + tl.arange(0, 16)
        tl.store(rows, tl.load(rows) + 1)


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=1) for b in (64, 128)]
tuned_double = tuned(CONFIGS, ["n"], {"BLOCK": 256}, {"BLOCK": 16})(double_kernel)
'''

DRIVER = '''
import json, sys
import torch
import toy_kernels as toy
from benchmarks import triton_check as tc

if __name__ == "__main__":  # the compile workers are spawned and import this file again
    recorder = tc.Recorder()
    x, y = torch.zeros(1000), torch.zeros(1000)
    with recorder.recording():
        recorder.launch = "plain"
        toy.double_kernel[(8,)](x, y, 1000, BLOCK=128)
        toy.early_return_kernel[(1,)](x, 4, WIDE=True)
        recorder.launch = "tuned"
        toy.tuned_double[lambda meta: (1,)](x, y, 1000)
    rows = tc.compile_all(recorder.jobs, 90, workers=2)
    json.dump({"rows": [dict(name=r.job.name, constexprs=dict(r.job.constexprs), options=dict(r.job.options),
                             divisible=list(r.job.divisible), default=r.uses.default, launches=r.uses.launches,
                             error=r.error, registers=r.registers, shared=r.shared_bytes, fits=r.fits)
                        for r in rows],
               "failures": tc.failures(rows)}, sys.stdout)
'''


@pytest.mark.slow
def test_toy_launches_are_recorded_compiled_and_judged(tmp_path):
    (tmp_path / "toy_kernels.py").write_text(TOY)
    (tmp_path / "driver.py").write_text(DRIVER)
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py")], capture_output=True, text=True, timeout=600,
                          env=child_env("TRITON_INTERPRET", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    rows = {(r["name"], r["constexprs"].get("BLOCK"), r["launches"][0]): r for r in out["rows"]}
    # one compile per distinct launch; the autotuned launch as its default and each of its configurations
    assert set(rows) == {("double_kernel", 128, "plain"), ("early_return_kernel", None, "plain"),
                         ("double_kernel", 256, "tuned"), ("double_kernel", 64, "tuned"),
                         ("double_kernel", 128, "tuned")}
    plain, default = rows["double_kernel", 128, "plain"], rows["double_kernel", 256, "tuned"]
    assert plain["default"] and plain["error"] is None and plain["registers"] > 0 and plain["fits"]
    assert set(plain["divisible"]) == {"x_ptr", "y_ptr"}  # 1000 is not a multiple of 16
    assert default["default"] and default["options"]["num_stages"] == 3  # tuned's default: 3 stages
    for block in (64, 128):
        assert not rows["double_kernel", block, "tuned"]["default"]
        assert rows["double_kernel", block, "tuned"]["options"]["num_stages"] == 1
    bad = rows["early_return_kernel", None, "plain"]
    assert not bad["fits"] and "redefines" in bad["error"]
    assert out["failures"] == [f"early_return_kernel [plain] default configuration: {bad['error']}"]


def _row(name, default, shared=0, error=None, calls=()):
    job = tc.Job("m", name, (), (), (), (("num_warps", 4),))
    return tc.Row(job, tc.Uses(["launch"], default, list(calls)), error=error, registers=128, shared_bytes=shared)


def test_what_fails_the_check():
    too_big = tc.MAX_SHARED_PER_BLOCK + 1
    ok = [_row("a", True), _row("a", False, shared=too_big, calls=[(1, "launch")]),
          _row("b", True, calls=[(2, "launch")]), _row("b", False, error="CompilationError", calls=[(2, "launch")])]
    assert tc.failures(ok) == []  # the autotuner drops a configuration that does not fit or compile
    assert tc.failures(ok, {"m.c_kernel"}) == ["m.c_kernel: never launched by record_library"]
    none_fit = [_row("d", False, shared=too_big, calls=[(3, "x")]), _row("d", False, error="E", calls=[(3, "x")])]
    assert tc.failures(none_fit) == ["d [x]: none of its 2 configurations compiles and fits"]
    assert tc.failures([_row("e", True, shared=too_big)]) == [
        f"e [launch] default configuration: {too_big} B of shared memory > {tc.MAX_SHARED_PER_BLOCK}"]
    # 128 registers x 32 threads x 4 warps = 16384 of 65536: 4 blocks; 100 KiB of shared memory: 2
    assert _row("f", True).blocks_per_sm() == 4
    assert _row("f", True, shared=100 * 1024).blocks_per_sm() == 2


def test_the_private_cache_leaves_the_callers_setting(monkeypatch):
    for before in ("/somewhere/else", None):
        if before is None:
            monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TRITON_CACHE_DIR", before)
        with pytest.raises(RuntimeError), tc.private_cache() as cache:
            assert os.environ["TRITON_CACHE_DIR"] == cache and Path(cache).is_dir()
            raise RuntimeError("a compile that fails")
        assert os.environ.get("TRITON_CACHE_DIR") == before and not Path(cache).exists()


def test_refusals_are_one_line_with_status_2():
    for env, flags, message in ((child_env("TRITON_INTERPRET", TRITON_INTERPRET="1"), [], "unset TRITON_INTERPRET"),
                                (child_env("TRITON_INTERPRET"), ["--workers", "0"], "--workers must be at least 1")):
        done = subprocess.run([sys.executable, "-m", "benchmarks.triton_check", *flags], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
