"""python -m gavamoe.train --out RUN_DIR [--data synthetic | --data REVIEWS.pickle --index-dir DIR] [--stage ...]
[--preset paper] ...

Stage 1 trains the VAE-GMM (RUN_DIR/stage1/), stage 2 the multi-gating MoE explainer on top of
it (RUN_DIR/stage2/); RUN_DIR/config.json records the data and both configs (gavamoe.runs). Every
flag and the data are checked before any training starts; a bad one is a one-line error and exit
status 2. The same command under ``torchrun --nproc_per_node N`` trains stage 2 with
DistributedDataParallel, or sharded with ``--fsdp`` (stage 1 runs on rank 0 while the others
wait). ``--dry-run`` prints stage 2's memory plan from the base model's config and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch.distributed as dist

from . import memory
from .errors import CliParser, UserInputError, run_cli, writable_out
from .models.explainer import ExplainerConfig
from .runs import DataSpec, Run
from .stage1 import Stage1Config, train_stage1
from .stage2 import Stage2Config, distributed_context, flag_dest, train_stage2

# The embedded synthetic data trains at width 128 (the paper's 768 is the default for PETER files):
# a fraction of the time, and the groups are recovered at either width (README, stage 1).
SYNTHETIC_EMBED_DIM = 128
SHARED = ("seed", "device", "beta", "preset")  # one flag for both stages
# the explainer's fields with a flag (the others, num_clusters and the tiny LLaMA's shape, are not flags)
EXPLAINER_FLAGS = ("base_model", "num_experts", "top_k", "expert_intermediate", "multi_gating", "dense",
                   "coarse_experts", "lora_rank")

# --preset paper: the settings of the paper (arXiv 2410.11841) and its released code
# (github.com/sugarandgugu/GaVaMoE), as flag defaults; flags given on the command line win. The
# base LLM is not set: give --base-model (the paper's is Llama-3.1-8B).
PRESETS: dict[str, dict] = {"default": {}, "paper": {
    # stage 1, released code: autoencoder pretraining at batch 2048, lr 1.5e-4, 50 epochs
    "pretrain_batch_size": 2048, "pretrain_lr": 1.5e-4, "pretrain_epochs": 50,
    # stage 1, released code: ELBO training at batch 4096, lr 1e-5, 30 epochs, StepLR(step 10, gamma 0.5)
    "batch_size": 4096, "lr": 1e-5, "epochs": 30, "lr_step_epochs": 10, "lr_step_gamma": 0.5,
    # stage 1, released code: KL weight from 0.01, +0.005 every 5 epochs, up to 0.1 (the paper's beta)
    "beta": 0.1, "beta_start": 0.01, "beta_step": 0.005, "beta_step_epochs": 5,
    # stage 1, released code: the reconstruction term scaled by 2 * embed_dim (embed_dim 768, the paper's),
    # of the pair's own rating only (no user context: README, stage 1)
    "recon_scale": 2 * 768.0, "embed_dim": 768, "context_ratings": 0,
    # stage 1, paper §3.2: a free embedding per user, and the encoder as wide as the embeddings
    "user_code": "embedding", "encoder_dim": None,
    # stage 2, paper §4.1.3: batch 1 with gradient accumulation 8, lr 3e-5, 3 epochs (the released
    # code accumulates 16 and trains 1 epoch in its TrainingArguments; the paper's text is followed)
    "stage2_batch_size": 1, "grad_accum": 8, "stage2_lr": 3e-5, "stage2_epochs": 3,
    # stage 2, released code: gradient clipping 0.3, LoRA rank 8 (alpha 16), explanations cut at 30 tokens
    "clip": 0.3, "lora_rank": 8, "max_explanation_tokens": 30,
    # generation (gavamoe.generate reads the run's preset): sampling at temperature 0.7, 30 new tokens
}}
def _add_field(group, dest: str, field, default, help_text: str | None = None) -> None:
    flag = "--" + dest.replace("_", "-")
    if isinstance(default, bool):
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    else:
        declared = str(field.type).split(" ")[0]  # "int | None" -> "int"
        kind = type(default) if default is not None else {"int": int, "float": float}.get(declared, str)
        group.add_argument(flag, dest=dest, type=kind, default=default, help=help_text)


HELP = {
    "multi_gating": "one gate per stage-1 cluster (--no-multi-gating: one shared gate, the paper's ablation)",
    "dense": "keep the base LLM's dense MLPs (no MoE; the paper's ablation)",
    "base_model": "stage 2 base LLM, a local path or Hub name of a LLaMA-family or GPT-2 causal LM "
                  "(default: an embedded tiny LLaMA with a tokenizer trained on the data)",
    "lora_rank": "LoRA rank on the attention projections (0: no LoRA, train the whole LLM)",
    "stop_after": "stop after this many optimizer steps (checkpoint written; continue with --resume)",
    "resume": "continue stage 2 from RUN_DIR/stage2/checkpoint.pt",
    "num_clusters": "K clusters of stage 1 = gates per MoE layer in stage 2 (the paper's Table 3 sweep)",
    "coarse_experts": "E/k experts k times as wide, routed top-1: the paper's 'w/o fine-grained experts' ablation "
                      "(same total and active expert parameters)",
    "reassign_clusters": "route every pair by the VAE's current cluster at every step (default: the fixed stage-1 "
                         "clusters, the paper's gates)",
    "sentiment": "the prompt's positive / negative from the rating (>= 3, the paper's input) or the template",
    "fsdp": "shard stage 2 with FSDP2 across the processes of torchrun (default: DDP when there are several)",
    "cpu_offload": "with --fsdp: keep parameters, gradients and optimizer state in host memory (one 80 GB GPU at 8B)",
    "user_code": "the VAE's user vector: 'history' (the mean embedding of the user's (item, rating) pairs) or "
                 "'embedding' (the paper's free embedding per user)",
    "encoder_dim": "width of the VAE's encoder Transformer (the paper's: --embed-dim)",
    "history_dropout": "with --user-code history: in training, the chance that each rating is left out of its "
                       "user's vector",
    "gradient_checkpointing": "recompute each decoder layer in backward instead of keeping its activations",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = CliParser(prog="python -m gavamoe.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or the path of a PETER reviews.pickle")
    p.add_argument("--index-dir", default=None, help="folder with train/validation/test.index")
    p.add_argument("--stage", default="all", choices=["1", "2", "all"])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="paper: the paper's and its released code's settings as defaults (README, presets)")
    for f in fields(DataSpec):
        if f.name.startswith("synthetic_"):
            p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    s1 = p.add_argument_group("stage 1 (VAE-GMM)")
    d1 = Stage1Config(device="cpu")
    for f in fields(Stage1Config):
        if f.name == "device":
            _add_field(s1, f.name, f, Stage1Config.device, HELP.get(f.name))
        elif f.name != "embed_dim":
            _add_field(s1, f.name, f, getattr(d1, f.name), HELP.get(f.name))
    s1.add_argument("--embed-dim", type=int, default=None,
                    help=f"user/item embedding size (default: {d1.embed_dim} as in the paper; "
                         f"{SYNTHETIC_EMBED_DIM} on the synthetic data, where it fits the data size)")
    s2 = p.add_argument_group("stage 2 (MoE explainer)")
    d2 = Stage2Config(device="cpu")
    for f in fields(ExplainerConfig):
        if f.name in EXPLAINER_FLAGS:
            _add_field(s2, f.name, f, getattr(d2.explainer, f.name), HELP.get(f.name))
    for f in fields(Stage2Config):
        if f.name not in SHARED and f.name != "explainer":
            _add_field(s2, flag_dest(f.name), f, getattr(d2, f.name), HELP.get(f.name))
    p.add_argument("--dry-run", action="store_true",
                   help="build stage 2 from --base-model's config on the meta device (no weights), print the memory "
                        "plan per GPU and exit; nothing is trained or written")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the processes to plan for (default: WORLD_SIZE, else 1)")
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def stage1_config(args: argparse.Namespace) -> Stage1Config:
    return Stage1Config(**{f.name: getattr(args, f.name) for f in fields(Stage1Config)})


def stage2_config(args: argparse.Namespace) -> Stage2Config:
    explainer = ExplainerConfig(**{name: getattr(args, name) for name in EXPLAINER_FLAGS})
    return Stage2Config(explainer=explainer, **{f.name: getattr(args, flag_dest(f.name))
                                                for f in fields(Stage2Config) if f.name != "explainer"})


def _dry_run(args: argparse.Namespace, stage2: Stage2Config | None, spec: DataSpec) -> int:
    """--dry-run: print stage 2's memory plan per GPU from the model built on the meta device."""
    if not args.dry_run:
        raise UserInputError("--world-size plans a dry run: give --dry-run with it (torchrun sets the real one)")
    if stage2 is None:
        raise UserInputError("--dry-run plans stage 2: give --stage 2 or --stage all")
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise UserInputError(f"--world-size must be at least 1, got {world}")
    data = spec.load()
    plan = memory.dry_run(stage1_config(args), stage2, data.num_users, data.num_items, world)
    print(plan.table())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.embed_dim is None:
        args.embed_dim = SYNTHETIC_EMBED_DIM if args.data == "synthetic" else Stage1Config.embed_dim
    # every check before any work: flags, devices, paths, the run directory, then the data's records
    stage1 = stage1_config(args) if args.stage in ("1", "all") else None
    stage2 = stage2_config(args) if args.stage in ("2", "all") else None
    spec = DataSpec.from_args(args)
    if args.dry_run or args.world_size is not None:
        return _dry_run(args, stage2, spec)
    if stage2 is not None:
        stage2.check_launch()
    run = Run(writable_out(args.out))
    ctx = distributed_context(args.device, stage2.fsdp) if stage2 is not None else None
    main_rank = ctx is None or ctx.main
    if main_rank:
        run.start(spec, spec.fingerprint())
    data = spec.load()
    if stage1 is not None:
        if main_rank:
            _, metrics = train_stage1(data, args.out, stage1)
            run.record_stage1(stage1)
            print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
        if ctx is not None:
            ctx.barrier()
    if stage2 is not None:
        result = train_stage2(data, args.out, stage2)
        if result is not None:
            summary = {k: v for k, v in result[1].items() if k != "weight_sha256"}
            print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        # every rank waits for rank 0's files, then leaves the group: a rank that exited with the
        # group's threads alive aborted ("terminate called without an active exception", seen in CI)
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gavamoe.train", main))
