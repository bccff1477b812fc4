"""python -m gavamoe.fame --out RUN [--data synthetic | --data PATH.inter] [--model fame | sasrec]
[--num-experts N] [--num-heads H] ...

Trains FAME (or the SASRec baseline under the identical protocol) with early stopping on
validation NDCG@10 and writes RUN/metrics.json ({"test": {...}, "validation": {...}}, each with
hr@5, hr@10, hr@20, ndcg@5, ndcg@10, ndcg@20, plus the popularity baseline, the config and the
per-epoch history), RUN/loss_curve.png and, for FAME, RUN/gates.png. Every flag and the data
are checked before training; a bad one is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CliParser, run_cli, writable_out
from .data import planted_facets, read_inter
from .model import HEAD_MIXES, MODELS, SeqRecConfig
from .train import TrainConfig, train

# Training defaults: SASRec's usual ones for .inter files; the small synthetic set takes more, smaller
# steps, and its loss sits at the uniform level for some 30 epochs before the models find the
# facets (measured), so early stopping waits longer there.
FILE_DEFAULTS = {"patience": 10, "batch_size": 256, "lr": 1e-3}
SYNTHETIC_DEFAULTS = {"patience": 25, "batch_size": 64, "lr": 3e-3}


def parse_args(argv=None) -> argparse.Namespace:
    p = CliParser(prog="python -m gavamoe.fame", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--data", default="synthetic", help="'synthetic' (planted facets) or a RecBole .inter file")
    p.add_argument("--model", default="fame", choices=MODELS)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=4, help="N experts per head (FAME)")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per head kept by the router (default: all N, FAME's dense routing; fewer is our "
                        "sparse variant)")
    p.add_argument("--head-mix", default="logits", choices=HEAD_MIXES,
                   help="what the gate over heads mixes: the heads' scores (default) or their probabilities")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2, help="transformer blocks, the last one FAME's")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.2)
    for name, value in (("epochs", 200), ("weight_decay", 0.0), ("seed", 0)):
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    for name, kind in (("patience", int), ("batch_size", int), ("lr", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"default {FILE_DEFAULTS[name]} for .inter files, {SYNTHETIC_DEFAULTS[name]} on the "
                            f"synthetic data")
    p.add_argument("--device", default=TrainConfig.device)
    synthetic = p.add_argument_group("synthetic data (planted facets)")
    for name, value in (("users", 1000), ("items", 100), ("facets", 2), ("values", 4), ("length", 20)):
        synthetic.add_argument(f"--synthetic-{name}", type=int, default=value)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name, value in (SYNTHETIC_DEFAULTS if args.data == "synthetic" else FILE_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    config = TrainConfig(args.epochs, args.patience, args.batch_size, args.lr, args.weight_decay, args.seed,
                         args.device)
    SeqRecConfig(1, args.model, args.dim, args.num_layers, args.num_heads, args.num_experts, args.top_k,
                 args.head_mix, args.max_len, args.dropout)  # the flags, before the data is read
    if args.data == "synthetic":
        data = planted_facets(args.synthetic_users, args.synthetic_items, args.synthetic_facets,
                              args.synthetic_values, args.synthetic_length, seed=args.seed)
    else:
        data = read_inter(args.data)
    model_config = SeqRecConfig(data.num_items, args.model, args.dim, args.num_layers, args.num_heads,
                                args.num_experts, args.top_k, args.head_mix, args.max_len, args.dropout)
    writable_out(args.out)
    metrics = train(data, model_config, config, args.out, list(sys.argv[1:] if argv is None else argv))
    summary = {k: metrics[k] for k in ("model", "test", "validation", "best_epoch", "popularity")}
    if "head_gate_nmi" in metrics:
        summary["head_gate_nmi"] = metrics["head_gate_nmi"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.fame", main))
