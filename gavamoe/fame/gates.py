"""python -m gavamoe.fame.gates RUN [--data PATH.inter]

Looks again at the gates of a finished FAME run: loads RUN/model.pt, scores the test users as the
run did, adds ``gate_sharpness`` (each gate's mean normalised entropy and largest weight) to
RUN/metrics.json, redraws RUN/gates.png and prints the sharpness. For runs made before
``gate_sharpness`` existed, and to see whether a run's routers choose at all: a mean expert weight
of 1/N fits both experts that every user weighs alike and sharp choices that average out.

The data are the run's own: the .inter file its config names (``--data`` when it has moved), or
the planted data from the generator's parameters it recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..errors import CliParser, UserInputError, run_cli
from ..runs import replacing
from .data import leave_one_out, planted_facets, read_inter
from .metrics import gate_sharpness
from .model import SeqRec, SeqRecConfig
from .train import evaluate, plot_gates


def main(argv=None) -> int:
    p = CliParser(prog="python -m gavamoe.fame.gates", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run's folder (python -m gavamoe.fame --out RUN)")
    p.add_argument("--data", default=None, help="the run's .inter file, where it is not at the recorded path")
    args = p.parse_args(argv)
    metrics_path, model_path = args.run / "metrics.json", args.run / "model.pt"
    for path in (metrics_path, model_path):
        if not path.is_file():
            raise UserInputError(f"{path}: not found (is {args.run} a finished run of python -m gavamoe.fame?)")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("model") != "fame":
        raise UserInputError(f"{args.run} is a {metrics.get('model')} run: only FAME has gates")
    config = metrics["config"]
    if args.data is not None or config["data"] != "synthetic":
        data = read_inter(args.data or config["data"])
    elif "synthetic" in config:
        data = planted_facets(**config["synthetic"])
    else:
        raise UserInputError(f"{args.run} records no parameters of its planted data (a run made before they were "
                             f"recorded): run it again")
    if len(data) != metrics["users"] or data.num_items != metrics["items"]:
        raise UserInputError(f"the data have {len(data)} users and {data.num_items} items, the run "
                             f"{metrics['users']} and {metrics['items']}: not the run's data")
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    model = SeqRec(SeqRecConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    _, weights = evaluate(model, leave_one_out(data, model.config.max_len)["test"], 1024, "cpu")
    metrics["gate_sharpness"] = gate_sharpness(weights["heads"], weights["experts"])
    plot_gates(weights, data, args.run / "gates.png")
    with replacing(metrics_path) as partial:
        partial.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics["gate_sharpness"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.fame.gates", main))
