"""The GPU runbook: what a lent GPU machine runs within its limits (about 15 minutes of device time
a session, the machine's start included, at most 10 minutes a command, no internet, a fresh
machine each time, the image's own python3 with torch, Triton, pytest, pytest-benchmark and
scikit-learn).

    python3 -m benchmarks.runbook session --out DIR  # make gpu-session: all of it, in order, to a deadline
    python3 -m benchmarks.runbook check             # make gpu-check
    python3 -m benchmarks.runbook bench --suite moe  # make bench-gpu SUITE=moe (decode, router, gmm, fame)

``check`` installs the project into the running python without dependencies and without build
isolation (building the CUDA extension with all cores), runs the ``gpu`` tests, then the kernels'
tests and then the rest of the suite with Triton compiled (``GAVAMOE_AUTOTUNE=0``: default tiles,
fast compiles; bf16 included), and writes ``benchmarks/results/<device>-tests.txt``: device,
versions, commit, the final pytest lines and the first lines of every failure. ``bench`` runs one
benchmark suite at its GPU shapes and writes ``benchmarks/results/<device>-<suite>.json`` and the
combined ``<device>.md/.png``. Both print their own timings.

``session`` installs once, then runs ``check`` and the suites one after another until a deadline
(``--budget-s``). A step still running at the deadline is stopped as Ctrl-C stops it, so pytest
still writes what it finished (the tests' summary, the benchmark rows measured so far); the steps
after it are listed as not reached. After every step the result files are packed into
``DIR/gpu-results.tar.gz``, one file that the device tool brings back even if the command is
killed later. Wheels in ``.whl/`` (Liger-Kernel, which the image lacks) are installed into a
scratch folder first.

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
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("moe", "decode", "router", "gmm", "fame")
STEPS = ("check", *SUITES)  # a session's default order: the issue's order, the targets' suite first
# the kernels' own tests run compiled before the models' (which take most of the suite's time)
KERNEL_TESTS = ("tests/moe", "tests/gmm", "tests/test_extension.py")
PER_TEST_TIMEOUT_S = 300  # with pytest-timeout: one hung test cannot eat the 10-minute command
GRACE_S = 30  # after Ctrl-C at the deadline, this long to write the reports before a kill
MIN_STEP_S = 60  # a session starts no step with less than this left
PACKED = "gpu-results.tar.gz"


def _run(cmd: list[str], env: dict | None = None, log: Path | None = None, deadline: float | None = None) -> int:
    """Run ``cmd`` in the project root with ``env`` added to this environment (and Triton compiled:
    TRITON_INTERPRET removed), its output shown and kept in ``log``. At ``deadline`` (a
    ``time.time()``) it gets Ctrl-C (SIGINT, so pytest writes its reports), and is killed with
    its workers ``GRACE_S`` later."""
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        # Ctrl-C back to its default in the command: started from a background job (as a device
        # tool's command may be) or a pytest-xdist worker, it would inherit SIGINT ignored
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        timers = []
        if deadline is not None:
            left = max(deadline - start, 0.0)
            timers = [threading.Timer(left, _signal, (proc, signal.SIGINT, False)),
                      threading.Timer(left + GRACE_S, _signal, (proc, signal.SIGKILL, True))]
        for timer in timers:
            timer.daemon = True
            timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
        code = proc.wait()
        for timer in timers:
            timer.cancel()
    stopped = " (stopped at the deadline)" if _past(deadline) else ""
    print(f"  ({time.time() - start:.0f} s, exit {code}){stopped}", flush=True)
    return code


def _signal(proc: subprocess.Popen, sig: int, whole_group: bool) -> None:
    """Ctrl-C goes to the command alone (pytest-xdist stops its workers itself); the kill to its
    whole process group."""
    try:
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


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


def install(deadline: float | None = None) -> int:
    """The project into the running python: no dependencies, no build isolation, no index; the CUDA
    extension built with every core."""
    log = Path(tempfile.mkdtemp(prefix="gavamoe-runbook-")) / "install.log"
    code = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
                env={"MAX_JOBS": str(os.cpu_count() or 1)}, log=log, deadline=deadline)
    if code != 0:
        print(log.read_text()[-4000:])
    return code


def check(results: Path, dry_run: bool, deadline: float | None = None, installed: int | None = None) -> int:
    """``installed``: the exit status of the install already done (by a session); None installs here."""
    if not _cuda_or_dry_run("check", dry_run):
        return 2
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="gavamoe-runbook-"))
    start = time.time()
    code = install(deadline) if installed is None else installed
    steps: list[tuple[str, int, str]] = [("install (CUDA extension build)", code, "")]
    # default tiles (no autotuning) for ours and Liger's kernels: the suite checks values, not speed
    env = {"GAVAMOE_AUTOTUNE": "0", "LIGER_FUSED_MOE_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", *_pytest_speedups(cores // 2)]
    compiled = " (collected only: dry run)" if dry_run else ", Triton compiled"
    phases = [("gpu", "gpu-marked tests", ["tests/", "-m", "gpu"]),
              ("kernels", "the kernels' tests" + compiled, [*KERNEL_TESTS, "-m", "not gpu"]),
              ("rest", "the rest of the suite" + compiled,
               ["tests/", "benchmarks/", "-m", "not gpu", *(f"--ignore={path}" for path in KERNEL_TESTS)])]
    junits = []
    for key, name, args in phases:
        if _past(deadline):
            steps.append((name, 2, "not reached: the session's deadline had passed"))
            continue
        junit = work / f"{key}.xml"
        collect = ["--collect-only"] if dry_run and key != "gpu" else []
        code = _run([*base, *args, f"--junitxml={junit}", *collect], env=env, log=work / f"{key}.log",
                    deadline=deadline)
        stopped = " (stopped at the deadline)" if _past(deadline) else ""
        steps.append((name, code, final_line(work / f"{key}.log") + stopped))
        if not collect:
            junits.append(junit)
    results.mkdir(parents=True, exist_ok=True)
    summary = results / f"{_slug()}-tests.txt"
    lines = ["# GPU test run (python -m benchmarks.runbook check)", *environment_lines(),
             f"wall time {time.time() - start:.0f} s", ""]
    for name, code, last in steps:
        lines.append(f"{name}: exit {code}" + (f": {last}" if last else ""))
    found = [line for junit in junits for line in failures(junit)]
    lines += ["", f"failures ({len(found)}):", *found] if found else ["", "no failures"]
    summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"runbook: wrote {summary}")
    return max(code for _, code, _ in steps)


def bench(suite: str, results: Path, dry_run: bool, select: str | None = None,
          deadline: float | None = None) -> int:
    if not _cuda_or_dry_run("bench", dry_run):
        return 2
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", f"benchmarks/bench_{suite}.py",
           "--benchmark", f"--results={results}", "--durations=10", *_pytest_speedups(1)]  # one worker: timings
    if select:
        cmd += ["-k", select]
    if dry_run:
        cmd.append("--collect-only")
    return _run(cmd, env={"PYTHONUNBUFFERED": "1"}, deadline=deadline)


def session(steps: list[str], budget_s: float, out: Path, results: Path, dry_run: bool) -> int:
    """Each step in order until ``budget_s`` from now; the results packed into ``out`` after each."""
    if not _cuda_or_dry_run("session", dry_run):
        return 2
    start = time.time()
    deadline = start + budget_s
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    wheels = _install_wheels()
    installed = install(deadline)  # before any step: a suite alone needs the extension too
    done = [wheels, f"install: exit {installed}, {time.time() - start:.0f} s"]
    codes = [installed]
    for step in steps:
        left = deadline - time.time()
        if left < MIN_STEP_S:
            done.append(f"{step}: not reached ({left:.0f} s left of the {budget_s:.0f} s budget)")
            continue
        began = time.time()
        code = (check(results, dry_run, deadline, installed) if step == "check"
                else bench(step, results, dry_run, deadline=deadline))
        codes.append(code)
        stopped = ", stopped at the deadline" if _past(deadline) else ""
        done.append(f"{step}: exit {code}, {time.time() - began:.0f} s{stopped}")
        _pack(results, out, done)
    _pack(results, out, done)
    print("runbook session:", *done, sep="\n  ")
    return max(codes)


def _install_wheels() -> str:
    """Wheels carried in ``.whl/`` (no internet on the GPU machine) into a scratch folder on the path
    of every command the session runs. Returns the session file's line about them."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "wheels: none carried in .whl/"
    names = ", ".join(path.name for path in wheels)
    site = tempfile.mkdtemp(prefix="gavamoe-wheels-")
    code = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                 *map(str, wheels)])
    if code != 0:
        return f"wheels: pip exit {code} installing {names}; not on the path, so their peers' rows fail or skip"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return f"wheels: {names} installed"


def _pack(results: Path, out: Path, done: list[str]) -> Path:
    """This device's result files and the session's step lines, as ``out/gpu-results.tar.gz`` (one
    file: the device tool brings back at most 8). Unpack with ``tar xzf FILE -C benchmarks/results``."""
    slug = _slug()
    (results / f"{slug}-session.txt").write_text("\n".join(["# python -m benchmarks.runbook session",
                                                          *environment_lines(), "", *done]) + "\n")
    packed, partial = out / PACKED, out / (PACKED + ".tmp")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(results.glob(f"{slug}*")):
            tar.add(path, arcname=path.name)
    partial.replace(packed)
    return packed


def _slug() -> str:
    from benchmarks.conftest import device_slug

    return device_slug()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runbook", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("session", "check", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--dry-run", action="store_true",
                       help="CPU: every step that needs no CUDA, into a scratch folder")
        p.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
        if name == "bench":
            p.add_argument("--suite", required=True, choices=SUITES)
            p.add_argument("-k", dest="select", default=None,
                           help="pytest -k expression: a part of the suite (split one that outgrows a command)")
        if name == "session":
            p.add_argument("--out", type=Path, required=True, help="where the packed results go (the device's $OUT)")
            p.add_argument("--budget-s", type=float, default=540.0,
                           help="seconds from now to stop at (default 540: a 10-minute command with room to pack)")
            p.add_argument("--steps", default=",".join(STEPS),
                           help=f"comma-separated, in order, from {', '.join(STEPS)} (default all)")
    args = parser.parse_args(argv)
    if args.command == "session":
        steps = [step.strip() for step in args.steps.split(",") if step.strip()]
        unknown = sorted(set(steps) - set(STEPS))
        if unknown or not steps:
            parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(STEPS)}")
        if args.budget_s <= 0:
            parser.error("--budget-s must be positive")
    results = args.results or (Path(tempfile.mkdtemp(prefix="gavamoe-dry-run-")) if args.dry_run else RESULTS)
    if args.command == "session":
        return session(steps, args.budget_s, args.out, results, args.dry_run)
    if args.command == "check":
        return check(results, args.dry_run)
    return bench(args.suite, results, args.dry_run, args.select)


if __name__ == "__main__":
    sys.exit(main())
