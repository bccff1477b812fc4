"""python -m gavamoe.recovery [--out runs/recovery] [--quick]: does stage 1 recover planted user groups?

Writes PETER-format review sets with 4 planted user groups from three generators (make_synthetic's
rating styles, and planted_reviews' "taste" and "level", written independently of it), at several
data sizes, trains stage 1 on each as a user would (python -m gavamoe.train --stage 1 --data PATH,
at the defaults; only --embed-dim varies in the width rows; the size rows vary the users at 20
records each), and reports the adjusted Rand index of the users' majority clusters against their
groups (ari_users), the pairs' ARI and the test RMSE.
Writes OUT/results.json and OUT/results.md (the README's stage-1 table).
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

from . import train
from .data.synthetic import make_synthetic, planted_reviews
from .errors import CliParser, run_cli, writable_out

KINDS = ("synthetic", "taste", "level")
# (generator, users, records, embed_dim): each generator at the default width of a PETER file (None:
# 768), then at width 128, then the planted generators at half and twice the size (20 records a user)
QUICK = [(kind, 600, 12000, None) for kind in KINDS]
GRID = [*QUICK, *[(kind, 600, 12000, 128) for kind in KINDS],
        *[(kind, users, 20 * users, None) for users in (300, 1200) for kind in ("taste", "level")]]
FIELDS = ("user", "item", "rating", "template", "group")


def write_reviews(kind: str, users: int, records: int, path: Path) -> None:
    """A reviews.pickle of plain Python types (what load_peter admits), with ``group``."""
    if kind == "synthetic":
        rows = [{k: r[k] for k in FIELDS} for r in make_synthetic(users, users * 2 // 3, records, 4, seed=3).records]
    else:
        rows = planted_reviews(users, users * 5 // 6, records, 4, kind=kind, seed=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(rows, f)


def markdown(results: list[dict]) -> str:
    lines = ["| generator | users | records | embed dim | ARI (users' majority) | ARI (pairs) | test RMSE | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['users']} | {r['records']} | {r['embed_dim']} | {r['ari_users']:.3f} | "
                     f"{r['ari']:.3f} | {r['rmse']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = CliParser(prog="python -m gavamoe.recovery", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/recovery"))
    p.add_argument("--quick", action="store_true", help="only the three generators at width 768")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    writable_out(args.out)
    results = []
    for kind, users, records, width in QUICK if args.quick else GRID:
        name = f"{kind}-{users}-{records}-{width or 'default'}"
        data = args.out / "data" / f"{kind}-{users}-{records}.pickle"
        if not data.exists():
            write_reviews(kind, users, records, data)
        run = args.out / name
        flags = ["--out", str(run), "--stage", "1", "--data", str(data)]
        flags += (["--embed-dim", str(width)] if width else []) + (["--device", args.device] if args.device else [])
        started = time.perf_counter()
        train.main(flags)
        metrics = json.loads((run / "stage1" / "metrics.json").read_text())
        results.append({"kind": kind, "users": users, "records": records, "embed_dim": metrics["config"]["embed_dim"],
                        "ari_users": metrics["ari_users"], "ari": metrics["ari"], "rmse": metrics["test"]["rmse"],
                        "seconds": time.perf_counter() - started})
        print(f"[recovery] {name}: ARI users {metrics['ari_users']:.3f}, pairs {metrics['ari']:.3f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.recovery", main))
