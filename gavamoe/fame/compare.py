"""python -m gavamoe.fame.compare --out DIR [--seeds 3] [any flag of python -m gavamoe.fame]

FAME, SASRec and FAME with one expert per head (--num-experts 1), each over several seeds (data
and initialisation), under the identical protocol of ``python -m gavamoe.fame``; writes
DIR/<model>-seed<s>/ for every run and DIR/comparison.json and DIR/comparison.md: the test
metrics' mean and standard deviation over seeds, the popularity baseline, and, on the synthetic
data, the planted-truth ranker (the ceiling) and the normalised mutual information between the
head gate's choice and the planted facet; for FAME, how evenly its routers weigh the experts (the
normalised entropy of ``gate_sharpness``, averaged over heads). DIR/comparison.png shows every
seed's NDCG@10 and HR@10 against the mean ± std.

A comparison cut short (a time limit, a lost machine) resumes: the same command again reuses every
run that finished with the same flags (its RUN/metrics.json records them) and trains the rest.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from .. import plots
from ..errors import CliParser, UserInputError, run_cli
from . import __main__ as fame_cli

VARIANTS = {"fame": ["--model", "fame"], "sasrec": ["--model", "sasrec"],
            "fame, 1 expert": ["--model", "fame", "--num-experts", "1"]}
SHOWN = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


def main(argv=None) -> int:
    p = CliParser(prog="python -m gavamoe.fame.compare", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, default=3)
    args, rest = p.parse_known_args(argv)
    if args.seeds < 2:
        raise UserInputError(f"--seeds must be at least 2 (the spread over seeds is the point), got {args.seeds}")
    if any(flag in rest for flag in ("--out", "--model", "--seed", "--num-experts")):
        raise UserInputError("--out, --model, --seed and --num-experts are set by the comparison")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, flags in VARIANTS.items():
            out = args.out / f"{name.replace(', ', '-').replace(' ', '')}-seed{seed}"
            command = ["--out", str(out), "--seed", str(seed), *flags, *rest]
            metrics = _finished(out, command)
            if metrics is None:
                fame_cli.main(command)
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                print(f"{out}: finished earlier with the same flags, reused", file=sys.stderr)
            runs[name].append(metrics)
    summary = {name: _summary(metrics) for name, metrics in runs.items()}
    summary["popularity"] = _summary([{"test": m["popularity"]["test"]} for m in runs["sasrec"]])
    if "oracle" in runs["sasrec"][0]:
        summary["oracle (planted truth)"] = _summary([{"test": m["oracle"]["test"]} for m in runs["sasrec"]])
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=2))
    (args.out / "comparison.md").write_text(_table(summary, args.seeds))
    plots.seed_spread(summary, ("ndcg@10", "hr@10"), args.out / "comparison.png",
                      f"test metrics over {args.seeds} seeds: each seed, mean ± std")
    print(_table(summary, args.seeds))
    return 0


def _finished(out: Path, command: list[str]) -> dict | None:
    """The metrics of the run in ``out`` if it finished with exactly these flags, else None."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics["config"].get("command") == command else None


def _expert_entropy(metrics: dict) -> float | None:
    """The experts' routers' normalised entropy (1 = uniform), averaged over the heads; None where
    there is no choice to measure (one expert a head, whose entropy reads 0 as if one-hot)."""
    sharpness = metrics.get("gate_sharpness")  # FAME only; runs made before it existed lack it
    if sharpness is None or metrics["config"]["model"]["num_experts"] == 1:
        return None
    return statistics.mean(e["entropy"] for e in sharpness["experts"])


# shown beside the test metrics for a model whose every run has them: key -> (column, reader)
EXTRAS = {"head_gate_nmi": ("head gate NMI with the planted facet", lambda m: m.get("head_gate_nmi")),
          "expert_entropy": ("experts' routing entropy (1 uniform)", _expert_entropy)}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "values": values}


def _summary(metrics: list[dict]) -> dict:
    out = {key: _spread([m["test"][key] for m in metrics]) for key in metrics[0]["test"]}
    for key, (_, read) in EXTRAS.items():
        values = [read(m) for m in metrics]
        if None not in values:
            out[key] = _spread(values)
    return out


def _table(summary: dict, seeds: int) -> str:
    extras = [key for key in EXTRAS if any(key in s for s in summary.values())]
    lines = [f"test metrics, mean ± std over {seeds} seeds", "",
             "| model | " + " | ".join([*SHOWN, *(EXTRAS[key][0] for key in extras)]) + " |",
             "|---|" + "---|" * (len(SHOWN) + len(extras))]
    for name, s in summary.items():
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" for k in SHOWN]
        cells += [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else "" for k in extras]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.fame.compare", main))
