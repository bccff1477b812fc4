"""Markdown summary and PNG chart of one benchmark run, from pytest-benchmark's JSON.

``pytest benchmarks/ --benchmark`` writes ``benchmarks/results/<device>.json`` and calls this;
``python -m benchmarks.report benchmarks/results/<device>.json`` redoes it by hand. For each
case: median time, TFLOP/s and GB/s, the fraction of the limit measured in the same run (a
dense matmul of equal FLOPs, or a copy of equal bytes), peak memory on a GPU, and the speedup
of the best gavamoe variant over each peer. Only benchmarks whose correctness check passed
are in the JSON (a failed check fails the test before timing), and a speedup is printed only
between two rows that both carry ``checked``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _rows(output_json: dict) -> dict[str, list[dict]]:
    cases = defaultdict(list)
    for bench in output_json["benchmarks"]:
        info = bench.get("extra_info", {})
        if "case" not in info:
            continue
        median = bench["stats"]["median"]
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


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def header(env: dict) -> str:
    return (f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
            f"CUDA {env.get('cuda')} · commit {env.get('commit')}")


def markdown(output_json: dict) -> str:
    env = output_json.get("gavamoe", {})
    lines = [f"# Benchmarks: {env.get('device')}", "", header(env), "",
             f"Run at {output_json.get('datetime', '?')}. Medians; every row's output was checked against the "
             "reference before timing. `% of limit`: TFLOP/s against the dense matmul of equal FLOPs, or GB/s "
             "against the copy of equal bytes, both measured in this run. `speedup`: the best gavamoe row over "
             "that row.", ""]
    for case, rows in sorted(_rows(output_json).items()):
        limit, best = _limit(rows), _best_ours(rows)
        lines += [f"## {case}", "",
                  "| implementation | role | median | TFLOP/s | GB/s | % of limit | peak MiB | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["median"]):
            fraction = _fraction(r, limit)
            speedup = (f"{r['median'] / best['median']:.2f}x" if best is not None and r["role"] == "peer"
                       and r.get("checked") else "")
            lines.append(
                f"| {r['impl']} | {r['role']} | {_time(r['median'])} | {_fmt(r['tflops'], '.2f')} | "
                f"{_fmt(r['gbps'], '.1f')} | {_fmt(fraction and 100 * fraction, '.0f')} | "
                f"{_fmt(r.get('peak_mib'), '.0f')} | {speedup} |")
        lines.append("")
    return "\n".join(lines)


def chart(output_json: dict, path: Path) -> None:
    """Horizontal bars: each implementation's median relative to the best gavamoe row of its case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colours = [], [], []
    for case, rows in sorted(_rows(output_json).items()):
        best = _best_ours(rows)
        if best is None:
            continue
        for r in sorted(rows, key=lambda r: r["median"]):
            labels.append(f"{case} · {r['impl']}")
            values.append(r["median"] / best["median"])
            colours.append({"ours": "tab:blue", "peer": "tab:orange", "limit": "tab:gray"}[r["role"]])
    if not labels:
        return
    from matplotlib.patches import Patch

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
    ax.set_title(header(output_json.get("gavamoe", {})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output_json: dict, json_path: Path) -> tuple[Path, Path]:
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(output_json))
    chart(output_json, png_path)
    return md_path, png_path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.report benchmarks/results/<device>.json")
    source = Path(sys.argv[1])
    for written in write_report(json.loads(source.read_text()), source):
        print(written)
