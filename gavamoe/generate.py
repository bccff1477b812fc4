"""python -m gavamoe.generate --run RUN_DIR --split test --out PRED.jsonl

Explanations from a trained run (RUN_DIR/stage2/model.pt) for one split of the run's data:
batched, left-padded prompts, the KV cache, each pair routed by the cluster stage 2 trained it
with (RUN_DIR/stage2/clusters.pt). Decoding as the run's preset says (default: greedy; paper:
sampling at temperature 0.7 for 30 new tokens) or as --sample / --temperature / --top-p /
--max-new-tokens say. Writes one JSON object per line: user, item, cluster, features, reference,
generated (and rating, user_train_count for the sparsity breakdown).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data import ReviewData
from .data import text as text_data
from .errors import CliParser, UserInputError, check_at_least_one, check_device, check_ranges, run_cli, writable_out
from .models.explainer import Explainer, load_tokenizer
from .progress import Progress
from .runs import Run


def load_run(run_dir: Path, device: str = "cpu") -> tuple[Explainer, object, ReviewData, dict]:
    """(model, tokenizer, data, stage-2 config) of a finished run whose stage 2 is current (trained on
    the stage 1 and the data files the run holds now)."""
    run = Run(run_dir)
    config = run.stage2_config()
    data = run.load_data()
    tokenizer = load_tokenizer(str(run.stage2_dir / "tokenizer"))
    model = Explainer.from_checkpoint(torch.load(run.stage2_dir / "model.pt", weights_only=True,
                                                 map_location="cpu"), tokenizer)
    return model.to(device).eval(), tokenizer, data, config


# decoding per preset (gavamoe.train --preset): the paper samples at temperature 0.7 for 30 new
# tokens (released code); None: the training length cap + 1
DECODING = {"default": {"sample": False, "temperature": 1.0, "max_new_tokens": None},
            "paper": {"sample": True, "temperature": 0.7, "max_new_tokens": 30}}


def generate_split(model: Explainer, tokenizer, records: list[dict], batch_size: int = 64, max_new_tokens: int = 33,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   max_explanation_tokens: int = 32, sentiment: str = "rating",
                   clusters: torch.Tensor | None = None) -> tuple[list[str], list[int]]:
    """(generated texts, clusters routed by) for ``records``, in their order; ``clusters`` (n,):
    the records' clusters (default: the VAE's assignment)."""
    device = next(model.parameters()).device
    split = text_data.encode(records, tokenizer, max_explanation_tokens, sentiment, clusters)
    texts, routed = [], []
    for s in Progress(range(0, len(split), batch_size), desc="generate"):
        batch = text_data.prompt_batch(split, list(range(s, min(s + batch_size, len(split)))), tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        cluster = model.routed_clusters(batch["users"], batch["items"], batch.pop("clusters", None))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(**batch, gate_ids=model.gate_ids(cluster), max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p)
        texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        routed += cluster.tolist()
    return texts, routed


def parse_args(argv=None) -> argparse.Namespace:
    p = CliParser(prog="python -m gavamoe.generate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="run directory of python -m gavamoe.train")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--preset", choices=sorted(DECODING), default=None,
                   help="decoding of a preset (default: the preset the run was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the preset's (default preset: the "
                                                                      "training length cap + 1)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: the preset's)")
    p.add_argument("--temperature", type=float, default=None, help="default: the preset's")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N records of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_at_least_one(args, ("batch_size", "max_new_tokens"))
    check_ranges(args, {"seed": "be non-negative", "limit": "be non-negative", "temperature": "be positive",
                        "top_p": "lie in (0, 1]"})
    check_device(args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer, data, config = load_run(args.run, args.device)
    writable_out(args.out, folder=False)
    records = data.split(args.split)[:args.limit]
    decoding = DECODING[args.preset or config.get("preset", "default")]
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in decoding.items()}
    max_new = chosen["max_new_tokens"] or config["max_explanation_tokens"] + 1
    table = None
    if not config.get("reassign_clusters", True):
        path = Run(args.run).stage2_clusters
        if not path.exists():
            raise UserInputError(f"{path} not found: stage 2 routed by it; train stage 2 again (--stage 2)")
        table = torch.load(path, weights_only=True)[args.split][:args.limit]
    texts, clusters = generate_split(model, tokenizer, records, args.batch_size, max_new, chosen["sample"],
                                     chosen["temperature"], args.top_p, config["max_explanation_tokens"],
                                     config.get("sentiment", "template"), table)
    with open(args.out, "w") as f:
        for record, generated, cluster in zip(records, texts, clusters, strict=True):
            f.write(json.dumps({"user": record["user"], "item": record["item"], "cluster": cluster,
                                "features": [text_data.feature(record)], "reference": text_data.explanation(record),
                                "generated": generated, "rating": float(record["rating"]),
                                "user_train_count": int(data.user_train_freq[record["user_idx"]])}) + "\n")
    print(f"wrote {len(records)} explanations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.generate", main))
