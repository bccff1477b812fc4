"""The GPU runbook: what a lent GPU machine runs, one command at a time, within its limits (about
30 minutes of GPU time in all, at most 10 minutes a command, no internet, a fresh machine each
time, the image's own python3 with torch, Triton, pytest, pytest-benchmark and scikit-learn).

    python3 -m benchmarks.runbook check             # make gpu-check
    python3 -m benchmarks.runbook bench --suite moe  # make bench-gpu SUITE=moe (decode, router, gmm)

``check`` installs the project into the running python without dependencies and without build
isolation (building the CUDA extension with all cores), runs the ``gpu`` tests and then the
whole suite with Triton compiled (``GAVAMOE_AUTOTUNE=0``: default tiles, fast compiles; bf16
included), and writes ``benchmarks/results/<device>-tests.txt``: device, versions, commit, the
final pytest lines and the first lines of every failure. ``bench`` runs one benchmark suite at
its GPU shapes and writes ``benchmarks/results/<device>-<suite>.json`` and the combined
``<device>.md/.png``. Both print their own timings.

``--dry-run`` (CI, on the CPU) runs every step that does not need CUDA: the install, the pytest
commands (the gpu tests skip; the compiled suite and the benchmark suite are collected, not run)
and the summary file, into a scratch folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("moe", "decode", "router", "gmm", "fame")
PER_TEST_TIMEOUT_S = 300  # with pytest-timeout: one hung test cannot eat the 10-minute command


def _run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> int:
    """Run ``cmd`` in the project root with ``env`` added to this environment (and Triton compiled:
    TRITON_INTERPRET removed), its output shown and kept in ``log``."""
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
        code = proc.wait()
    print(f"  ({time.time() - start:.0f} s, exit {code})", flush=True)
    return code


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _pytest_speedups(workers: int) -> list[str]:
    """xdist and pytest-timeout where this python has them (the GPU image has both)."""
    out = []
    if workers > 1 and _has("xdist"):
        out += ["-n", str(workers)]
    if _has("pytest_timeout"):
        out += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    return out


def _cuda_or_dry_run(command: str, dry_run: bool) -> bool:
    """A real run needs a CUDA device; on a CPU machine only --dry-run goes on."""
    import torch

    if dry_run or torch.cuda.is_available():
        return True
    print(f"runbook {command}: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
    return False


def environment_lines() -> list[str]:
    import torch

    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device {props.name}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB, L2 {props.L2_cache_size / 2**20:.0f} MiB")
    else:
        lines.append(f"device: none (CPU {platform.machine()}, {os.cpu_count()} cores)")
    from benchmarks.common import environment

    lines.append(f"commit {environment()['commit']}")
    return lines


def failures(junit: Path, lines_each: int = 6) -> list[str]:
    """'test id: first lines of its failure' for every failed or erroring test in a junit file."""
    if not junit.exists():
        return [f"(no junit report at {junit}: pytest did not finish)"]
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                text = (node.get("message") or "") + "\n" + (node.text or "")
                head = [line for line in text.strip().splitlines() if line.strip()][:lines_each]
                out.append(f"{case.get('classname')}::{case.get('name')} [{kind}]\n    " + "\n    ".join(head))
    return out


def final_line(log: Path) -> str:
    """pytest's closing line ('N passed, M failed in S s', or 'N tests collected in S s')."""
    words = ("passed", "failed", "skipped", "error", "collected")
    text = log.read_text() if log.exists() else ""
    lines = [line.strip("= \n") for line in text.splitlines() if " in " in line and any(w in line for w in words)]
    return lines[-1] if lines else "(no pytest summary line)"


def check(results: Path, dry_run: bool) -> int:
    if not _cuda_or_dry_run("check", dry_run):
        return 2
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="gavamoe-runbook-"))
    steps: list[tuple[str, int, str]] = []
    start = time.time()
    code = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
                env={"MAX_JOBS": str(cores)}, log=work / "install.log")
    steps.append(("install (CUDA extension build)", code, ""))
    if code != 0:
        print((work / "install.log").read_text()[-4000:])
    # default tiles (no autotuning) for ours and Liger's kernels: the suite checks values, not speed
    env = {"GAVAMOE_AUTOTUNE": "0", "LIGER_FUSED_MOE_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1"}
    gpu_junit, all_junit = work / "gpu.xml", work / "all.xml"
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"]
    code = _run([*base, "tests/", "-m", "gpu", f"--junitxml={gpu_junit}", *_pytest_speedups(cores // 2)], env=env,
                log=work / "gpu.log")
    steps.append(("gpu-marked tests", code, final_line(work / "gpu.log")))
    suite = [*base, "tests/", "benchmarks/", f"--junitxml={all_junit}", *_pytest_speedups(cores // 2)]
    if dry_run:
        suite.append("--collect-only")
    code = _run(suite, env=env, log=work / "all.log")
    steps.append(("whole suite, Triton compiled" + (" (collected only: dry run)" if dry_run else ""), code,
                  final_line(work / "all.log")))
    results.mkdir(parents=True, exist_ok=True)
    summary = results / f"{_slug()}-tests.txt"
    lines = ["# GPU test run (python -m benchmarks.runbook check)", *environment_lines(),
             f"wall time {time.time() - start:.0f} s", ""]
    for name, code, last in steps:
        lines.append(f"{name}: exit {code}" + (f": {last}" if last else ""))
    found = failures(gpu_junit) + ([] if dry_run else failures(all_junit))
    lines += ["", f"failures ({len(found)}):", *found] if found else ["", "no failures"]
    summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"runbook: wrote {summary}")
    return max(code for _, code, _ in steps)


def bench(suite: str, results: Path, dry_run: bool, select: str | None = None) -> int:
    if not _cuda_or_dry_run("bench", dry_run):
        return 2
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", f"benchmarks/bench_{suite}.py",
           "--benchmark", f"--results={results}", "--durations=10", *_pytest_speedups(1)]  # one worker: timings
    if select:
        cmd += ["-k", select]
    if dry_run:
        cmd.append("--collect-only")
    return _run(cmd, env={"PYTHONUNBUFFERED": "1"})


def _slug() -> str:
    from benchmarks.conftest import device_slug

    return device_slug()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runbook", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--dry-run", action="store_true",
                       help="CPU: every step that needs no CUDA, into a scratch folder")
        p.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
        if name == "bench":
            p.add_argument("--suite", required=True, choices=SUITES)
            p.add_argument("-k", dest="select", default=None,
                           help="pytest -k expression: a part of the suite (split one that outgrows a command)")
    args = parser.parse_args(argv)
    results = args.results or (Path(tempfile.mkdtemp(prefix="gavamoe-dry-run-")) if args.dry_run else RESULTS)
    if args.command == "check":
        return check(results, args.dry_run)
    return bench(args.suite, results, args.dry_run, args.select)


if __name__ == "__main__":
    sys.exit(main())
