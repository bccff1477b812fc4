"""Markdown summary and PNG chart of the benchmark results of one device, from the suite files
``benchmarks/results/<device>-<suite>.json`` that ``pytest benchmarks/ --benchmark`` writes.

``python -m benchmarks.report [RESULTS_DIR] [DEVICE_SLUG]`` redoes it by hand. For each case:
the median time of one call (CUDA events on a GPU), TFLOP/s and GB/s, the fraction of the limit
measured in the same run (a dense matmul of equal FLOPs, or a copy of equal bytes), for our rows
the traffic model's prediction and measured / predicted, peak memory on a GPU, and the speedup of
the best gavamoe row over each peer. A speedup is printed only between rows whose check against
the float64 reference passed; a peer that missed it is shown with its error and no speedup.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _rows(output_json: dict) -> dict[str, list[dict]]:
    cases = defaultdict(list)
    for bench in output_json["benchmarks"]:
        info = bench.get("extra_info", {})
        if "case" not in info or not info.get("call_seconds"):
            continue
        median = statistics.median(info["call_seconds"])
        row = dict(info, median=median)
        row["tflops"] = info["flops"] / median / 1e12 if info.get("flops") else None
        row["gbps"] = info["bytes"] / median / 1e9 if info.get("bytes") else None
        cases[info["case"]].append(row)
    return dict(cases)


def _limit(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["role"] == "limit"), None)


def _fraction(row: dict, limit: dict | None) -> float | None:
    """Rate against the limit: TFLOP/s against the dense matmul's, else GB/s against the copy's."""
    if limit is None or row is limit:
        return None
    if limit.get("tflops") and row.get("tflops"):
        return row["tflops"] / limit["tflops"]
    if limit.get("gbps") and row.get("gbps"):
        return row["gbps"] / limit["gbps"]
    return None


def _best_ours(rows: list[dict]) -> dict | None:
    ours = [r for r in rows if r["role"] == "ours" and r.get("checked")]
    return min(ours, key=lambda r: r["median"]) if ours else None


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def _all_cases(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """(case, its rows) over the suite files of a device, sorted by case."""
    cases: dict[str, list[dict]] = {}
    for run in runs:
        cases.update(_rows(run))
    return sorted(cases.items())


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _notes(row: dict) -> str:
    notes = []
    if row.get("checked") is False:
        notes.append(f"**failed the check**: {row.get('check', '')}")
    if row.get("fell_back_to_eager"):
        notes.append(f"**fell back to eager** ({row['fell_back_to_eager']})")
    elif "compiles" in row:
        n = row["compiles"]
        notes.append(f"compiled ({n} new graph{'s' if n != 1 else ''})" if n else "compiled (graph reused)")
    return "; ".join(notes)


def header(env: dict) -> str:
    return (f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
            f"CUDA {env.get('cuda')} · commit {env.get('commit')}")


def markdown(runs: list[dict]) -> str:
    env = runs[0].get("gavamoe", {})
    lines = [f"# Benchmarks: {env.get('device')}", ""]
    for run in runs:
        info = run.get("gavamoe", {})
        rates = info.get("rates", {})
        lines.append(f"- suite `{info.get('suite')}`: {header(info)}, run at {run.get('datetime', '?')}; rates "
                     f"measured: matmul {rates.get('tensor_flops', 0) / 1e12:.1f} TFLOP/s, fp32 "
                     f"{rates.get('fp32_flops', 0) / 1e12:.1f} TFLOP/s, "
                     f"copy {rates.get('copy_bytes', 0) / 1e9:.0f} GB/s")
    lines += ["", "Medians of one call (CUDA events on a GPU). Every row's output was checked against the float64 "
              "reference before timing. `% of limit`: TFLOP/s against the dense matmul of equal FLOPs, or GB/s "
              "against the copy of equal bytes, both in this run. `predicted`: the traffic model "
              "(benchmarks/model.py) at this run's measured rates, and measured / predicted. `speedup`: the best "
              "gavamoe row over that row.", ""]
    for case, rows in _all_cases(runs):
        limit, best = _limit(rows), _best_ours(rows)
        lines += [f"## {case}", "",
                  "| implementation | role | median | TFLOP/s | GB/s | % of limit | predicted | measured / predicted "
                  "| peak MiB | speedup | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["median"]):
            fraction = _fraction(r, limit)
            predicted = (r.get("prediction") or {}).get("seconds")
            speedup = (f"{r['median'] / best['median']:.2f}x" if best is not None and r["role"] == "peer"
                       and r.get("checked") else "")
            lines.append(
                f"| {r['impl']} | {r['role']} | {_time(r['median'])} | {_fmt(r['tflops'], '.2f')} | "
                f"{_fmt(r['gbps'], '.1f')} | {_fmt(fraction and 100 * fraction, '.0f')} | "
                f"{_time(predicted) if predicted else ''} | {_fmt(predicted and r['median'] / predicted, '.2f')} | "
                f"{_fmt(r.get('peak_mib'), '.0f')} | {speedup} | {_notes(r)} |")
        lines.append("")
    return "\n".join(lines)


def chart(runs: list[dict], path: Path) -> None:
    """Horizontal bars: each implementation's median relative to the best gavamoe row of its case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels, values, colours = [], [], []
    for case, rows in _all_cases(runs):
        best = _best_ours(rows)
        if best is None:
            continue
        for r in sorted(rows, key=lambda r: r["median"]):
            labels.append(f"{case} · {r['impl']}" + ("" if r.get("checked") else " (failed check)"))
            values.append(r["median"] / best["median"])
            colours.append({"ours": "tab:blue", "peer": "tab:orange", "limit": "tab:gray"}[r["role"]])
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(labels) + 1.8))
    ax.barh(range(len(labels)), values, color=colours)
    for y, v in enumerate(values):
        ax.annotate(f"{v:.2f}x", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("median time / best gavamoe time in its case (log scale; below 1 = faster than gavamoe)")
    ax.legend(handles=[Patch(color="tab:blue", label="gavamoe"), Patch(color="tab:orange", label="peers"),
                       Patch(color="tab:gray", label="limit: dense matmul / copy at equal work")],
              fontsize=7, loc="lower right")
    ax.set_title(header(runs[0].get("gavamoe", {})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def suite_files(results: Path, slug: str) -> list[Path]:
    return sorted(results.glob(f"{slug}-*.json"))


def write_combined_report(results: Path, slug: str) -> tuple[Path, Path]:
    """<slug>.md and <slug>.png from every suite file of the device in ``results``."""
    runs = [json.loads(p.read_text()) for p in suite_files(results, slug)]
    md_path, png_path = results / f"{slug}.md", results / f"{slug}.png"
    md_path.write_text(markdown(runs))
    chart(runs, png_path)
    return md_path, png_path


if __name__ == "__main__":
    from benchmarks.conftest import RESULTS, device_slug

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    slug = sys.argv[2] if len(sys.argv) > 2 else device_slug()
    if not suite_files(folder, slug):
        sys.exit(f"report: no {slug}-*.json in {folder}")
    for written in write_combined_report(folder, slug):
        print(written)
