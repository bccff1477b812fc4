"""python -m gavamoe.expctr --out RUN [--data synthetic | --data DIR] [--rounds R] [--moe] ...

Runs ExpCTR: the ID-only DeepFM, the label-free warm-up of the explanation LLM, then R rounds of
GRPO with the LC reward, the DeepFM on IDs plus explanation embeddings, and GRPO with the IC
reward. Writes RUN/metrics.json ({"all": {...}, "cold": {...}, "rounds": [...]}, AUC and LogLoss
of the ID model, ExpCTR-Aug, ExpCTR-LLM and the shuffled-explanation control), RUN/explanations.jsonl
(user, item, label, split, explanation), RUN/rewards.png and RUN/loss_curve.png. Every flag and
the data are checked before training; a bad one is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CliParser, run_cli, writable_out
from . import encoder as text_encoder
from .ctr import CtrConfig
from .data import planted_genres, read_movielens
from .llm import LlmConfig
from .prompts import WARMUP_READINGS
from .rl import REWARD_FORMS
from .train import RlConfig, train


def parse_args(argv=None) -> argparse.Namespace:
    p = CliParser(prog="python -m gavamoe.expctr", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (planted genres) or a MovieLens-style folder with ratings.csv and movies.csv")
    p.add_argument("--rounds", type=int, default=RlConfig.rounds, help="rounds of the three stages")
    p.add_argument("--steps", type=int, default=RlConfig.steps, help="GRPO steps in each RL stage of a round")
    p.add_argument("--batch-pairs", type=int, default=RlConfig.batch_pairs, help="prompts per GRPO step")
    p.add_argument("--group", type=int, default=RlConfig.group, help="explanations sampled per prompt (GRPO)")
    p.add_argument("--rl-lr", type=float, default=RlConfig.lr, help="learning rate of the LoRA policy")
    p.add_argument("--kl-coef", type=float, default=RlConfig.kl_coef, help="weight of KL(policy || warmed-up LLM)")
    p.add_argument("--temperature", type=float, default=RlConfig.temperature, help="sampling temperature in RL")
    p.add_argument("--reward-form", default=RlConfig.reward_form, choices=REWARD_FORMS,
                   help="reward = p(true label) or its log")
    p.add_argument("--lora-rank", type=int, default=LlmConfig.lora_rank)
    p.add_argument("--moe", action="store_true",
                   help="every MLP of the LLM a cluster-gated MoE routed by the user's cluster (a GMM on the ID "
                        "model's user embeddings)")
    p.add_argument("--num-experts", type=int, default=LlmConfig.num_experts)
    p.add_argument("--top-k", type=int, default=LlmConfig.top_k)
    p.add_argument("--num-clusters", type=int, default=LlmConfig.num_clusters)
    p.add_argument("--warmup-epochs", type=int, default=LlmConfig.warmup_epochs)
    p.add_argument("--warmup-prior", type=float, default=LlmConfig.warmup_prior,
                   help="how often the warm-up's verdict follows its readings (else a coin flip)")
    p.add_argument("--warmup-readings", default=LlmConfig.warmup_readings, choices=WARMUP_READINGS,
                   help="the warm-up explanations' genre readings: the prompt's, drawn at random, or hedged (the "
                        "prompt's, else 'a new genre'; see the README)")
    p.add_argument("--warmup-hedge", type=float, default=LlmConfig.warmup_hedge,
                   help="with --warmup-readings hedged: how often a warm-up reading is 'a new genre'")
    p.add_argument("--no-history-summary", dest="history_summary", action="store_false",
                   help="leave out the prompt's liked/disliked counts of the target's genres (see the README)")
    p.add_argument("--encoder", default=text_encoder.DEFAULT,
                   help="sentence encoder of the explanations: 'minilm' (the packaged all-MiniLM-L6-v2) or a "
                        "local folder")
    p.add_argument("--ctr-epochs", type=int, default=CtrConfig.epochs, help="most epochs of each DeepFM")
    p.add_argument("--ctr-patience", type=int, default=CtrConfig.patience,
                   help="stop a DeepFM after this many epochs without a better held-out LogLoss, keeping the best "
                        "epoch; 0 trains every epoch on all training pairs")
    p.add_argument("--ctr-lr", type=float, default=CtrConfig.lr, help="Adam's learning rate for each DeepFM")
    p.add_argument("--ctr-dropout", type=float, default=CtrConfig.dropout, help="dropout on the DeepFM MLP's input")
    p.add_argument("--ctr-validation", type=float, default=CtrConfig.validation,
                   help="fraction of the training pairs held out for the early stopping")
    p.add_argument("--ctr-dim", type=int, default=CtrConfig.dim)
    p.add_argument("--seed", type=int, default=RlConfig.seed)
    p.add_argument("--device", default=RlConfig.device)
    files = p.add_argument_group("MovieLens-style folders")
    files.add_argument("--test-fraction", type=float, default=0.2, help="the latest ratings held out for test")
    files.add_argument("--history", type=int, default=10, help="history items per user shown in the prompt")
    files.add_argument("--cold-max", type=int, default=15, help="a user with at most this many training pairs is cold")
    synthetic = p.add_argument_group("synthetic data (planted genres)")
    for name, value in (("users", 300), ("items", 300), ("warm_pairs", 30), ("test_pairs", 6)):
        synthetic.add_argument(f"--synthetic-{name.replace('_', '-')}", type=int, default=value)
    synthetic.add_argument("--synthetic-cold-fraction", type=float, default=0.3)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = RlConfig(args.rounds, args.steps, args.batch_pairs, args.group, args.rl_lr, args.kl_coef,
                      args.temperature, args.reward_form, args.seed, args.device)
    llm_config = LlmConfig(moe=args.moe, num_experts=args.num_experts, top_k=args.top_k,
                           num_clusters=args.num_clusters, lora_rank=args.lora_rank,
                           warmup_epochs=args.warmup_epochs, warmup_prior=args.warmup_prior,
                           warmup_readings=args.warmup_readings, warmup_hedge=args.warmup_hedge,
                           history_summary=args.history_summary)
    ctr_config = CtrConfig(dim=args.ctr_dim, epochs=args.ctr_epochs, lr=args.ctr_lr, dropout=args.ctr_dropout,
                           patience=args.ctr_patience, validation=args.ctr_validation)
    text_encoder.resolve(args.encoder)
    if args.data == "synthetic":
        data = planted_genres(args.synthetic_users, args.synthetic_items, args.synthetic_warm_pairs,
                              args.synthetic_test_pairs, args.synthetic_cold_fraction, args.history, args.seed)
    else:
        data = read_movielens(args.data, args.test_fraction, args.history, args.cold_max)
    writable_out(args.out)
    metrics = train(data, llm_config, ctr_config, config, args.encoder, args.out)
    print(json.dumps({k: metrics[k] for k in ("all", "cold", "rounds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.expctr", main))
