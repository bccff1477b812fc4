"""Stage 2 of GaVaMoE: train the multi-gating MoE explainer on top of stage 1.

Loss per batch (paper eq. 13): alpha * beta-ELBO of the VAE + (1 - alpha) * NLL of the
explanation tokens + aux_coef * the MoE layers' load-balancing loss. AdamW, gradient
accumulation, gradient clipping, linear warm-up then cosine decay; fp32 master weights with bf16
compute (gavamoe.scaling). Under ``torchrun`` the same code trains with DistributedDataParallel,
or with ``fsdp`` sharded by FSDP2 (gloo on the CPU, NCCL on GPUs): each rank takes its share of
every global batch, and rank 0 writes the files. The memory plan (gavamoe.memory) is printed
before the first step.

What trains: everything in the Explainer (the VAE through the ELBO and through the spliced
embeddings, the two projections, the LLM including every gate and expert), except with
``lora_rank > 0``, where the base LLM's own weights freeze and only the LoRA adapters on
attention, the MoE gates and experts, the projections and the VAE train.

Routing (paper: the gates are the stage-1 clusters): every training pair goes through the gate of
its cluster in stage1/assignments.csv, every other pair of the data through the gate of one
assignment by the VAE as it stands when stage 2 starts; the table is stored as clusters.pt and
generation routes by it too. ``reassign_clusters=True`` instead reassigns every pair at every step
with the VAE as it trains (metrics.json reports, either way, how many training pairs the final VAE
would put in another cluster than stage 1 did).

Writes RUN_DIR/stage2/{model.pt, tokenizer/, clusters.pt, metrics.json, loss_curve.png} and, while
it runs, checkpoint.pt, from which ``resume=True`` continues exactly where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import memory, plots, scaling
from .data import ReviewData
from .data import text as text_data
from .errors import UserInputError, check_at_least_one, check_device, check_finite, check_ranges
from .models import VaeGmm
from .models.explainer import Explainer, ExplainerConfig, load_language_model, load_tokenizer
from .progress import Progress
from .runs import Run, replacing


@dataclass
class Stage2Config:
    explainer: ExplainerConfig = field(default_factory=ExplainerConfig)  # num_clusters comes from stage 1
    epochs: int = 1
    batch_size: int = 32  # per process and micro-step
    grad_accum: int = 1
    # None: 3e-3 for the embedded tiny LLaMA trained from scratch, 1e-4 for a pretrained --base-model
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    clip: float = 0.3
    # weight of the ELBO in eq. 13; ours, chosen so the NLL leads while the VAE stays anchored
    alpha: float = 0.2
    beta: float = 0.01  # the ELBO's KL weight, as in stage 1
    # the Switch/Mixtral load-balancing coefficient (their 0.01)
    aux_coef: float = 0.01
    max_explanation_tokens: int = 32
    # the prompt's positive / negative: "rating" (>= 3, the paper's input) or the template's sentiment
    sentiment: str = "rating"
    # True: every step routes each pair by the VAE's current cluster (not the fixed stage-1 table)
    reassign_clusters: bool = False
    vocab_size: int = 4000  # of the embedded tokenizer
    checkpoint_every: int = 200  # optimizer steps
    stop_after: int = 0  # > 0: stop after this many optimizer steps in this call (a checkpoint is written)
    resume: bool = False
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    preset: str = "default"  # set by gavamoe.train --preset; generation decodes as the preset says
    # sharding and memory (gavamoe.scaling, gavamoe.memory)
    fsdp: bool = False  # FSDP2 under torchrun instead of DDP
    cpu_offload: bool = False  # with fsdp: parameters, gradients and the optimizer step on the host
    gradient_checkpointing: bool = False

    def __post_init__(self):
        flag = lambda name: "--" + _flag(name)
        check_finite(self, flag)
        if self.sentiment not in text_data.SENTIMENTS:
            raise UserInputError(f"--sentiment must be one of {', '.join(text_data.SENTIMENTS)}, got {self.sentiment}")
        if isinstance(self.explainer, dict):  # read back from a run's config.json
            self.explainer = ExplainerConfig(**self.explainer)
        check_at_least_one(self, ("epochs", "batch_size", "grad_accum", "max_explanation_tokens", "vocab_size",
                                  "checkpoint_every"), flag)
        if self.explainer.base_model is None and self.vocab_size < text_data.MIN_VOCAB:
            raise UserInputError(f"--vocab-size must be at least {text_data.MIN_VOCAB} (the 256 byte symbols and "
                                 f"{len(text_data.SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")
        check_ranges(self, {"alpha": "lie in [0, 1]", "lr": "be positive", "warmup_ratio": "lie in [0, 1)",
                            **dict.fromkeys(("beta", "aux_coef", "clip", "weight_decay", "stop_after", "seed"),
                                            "be non-negative")}, flag)
        if self.cpu_offload and not self.fsdp:
            raise UserInputError("--cpu-offload is FSDP's: give --fsdp with it")
        check_device(self.device)

    def check_launch(self) -> None:
        """--fsdp shards across the processes of torchrun (one or more): refuse a plain start."""
        if self.fsdp and "RANK" not in os.environ:
            raise UserInputError("--fsdp shards across processes: start it under torchrun "
                                 "(torchrun --nproc_per_node N -m gavamoe.train ...; N = 1 with --cpu-offload)")


# fields named as in stage 1, whose command-line flags carry a "stage2-" prefix (--stage2-lr)
PREFIXED_FIELDS = ("epochs", "batch_size", "lr", "weight_decay")


def flag_dest(name: str) -> str:
    """The argparse destination of a Stage2Config field: the field, or stage2_<field>."""
    return "stage2_" + name if name in PREFIXED_FIELDS else name


def _flag(name: str) -> str:
    return flag_dest(name).replace("_", "-")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def distributed_context(device: str, fsdp: bool = False) -> _Dist:
    """Join the process group when started by torchrun with WORLD_SIZE > 1 (with ``fsdp``, with
    any world size: FSDP needs the group even for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not (fsdp and "RANK" in os.environ):
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(config: Stage2Config, ctx: _Dist) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device


def _tokenizer(config: Stage2Config, data: ReviewData, stage_dir: Path, ctx: _Dist):
    """The saved tokenizer when there is one (resume, other ranks), else train or load it (rank 0)."""
    saved = stage_dir / "tokenizer"
    if ctx.main and not (config.resume and saved.exists()):
        if config.explainer.base_model is None:
            train = data.split("train")[:50000]
            texts = [text_data.prompt_text(r, None, config.sentiment) + " " + text_data.explanation(r)
                     for r in train]
            tokenizer = text_data.train_tokenizer(texts, config.vocab_size)
        else:
            tokenizer = load_tokenizer(config.explainer.base_model)
        tokenizer.save_pretrained(saved)
    ctx.barrier()
    return load_tokenizer(str(saved))


def build_explainer(config: Stage2Config, vae: VaeGmm, tokenizer) -> Explainer:
    """The explainer on stage 1's VAE: one gate per stage-1 cluster."""
    explainer_config = replace(config.explainer, num_clusters=vae.config.num_clusters)
    return Explainer(explainer_config, vae, load_language_model(explainer_config, tokenizer), tokenizer)


def stage1_clusters(run: Run, data: ReviewData) -> torch.Tensor:
    """The training records' clusters from stage1/assignments.csv, checked against the run's
    training split (same records in the same order)."""
    path = run.path / "stage1" / "assignments.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    train = data.split("train")
    if len(rows) != len(train) or any([u, i] != [str(r["user"]), str(r["item"])]
                                      for (u, i, _), r in zip(rows, train, strict=False)):
        raise UserInputError(f"{path} does not list the run's training records in order; re-run stage 1")
    return torch.tensor([int(c) for _, _, c in rows], dtype=torch.long)


def cluster_table(run: Run, data: ReviewData, vae: VaeGmm) -> dict[str, torch.Tensor]:
    """Each split's per-record clusters: stage 1's for the training records, one assignment by
    ``vae`` (as it stands now, fp32) for the validation and test records."""
    table = {"train": stage1_clusters(run, data)}
    for name in ("validation", "test"):
        tensors = data.tensors(name)
        table[name] = vae.assign_clusters(tensors["user"], tensors["item"]).cpu()
    return table


def _load_cluster_table(run: Run, data: ReviewData, vae: VaeGmm, config: Stage2Config, ctx: _Dist):
    """The fixed table of this stage 2 (None with ``reassign_clusters``): computed and stored once
    at the start (rank 0), read back on resume and by the other ranks."""
    if config.reassign_clusters:
        return None
    path = run.stage2_clusters
    if ctx.main and not (config.resume and path.exists()):
        torch.save(cluster_table(run, data, vae), path)
    ctx.barrier()
    return torch.load(path, weights_only=True)


def _schedule(total_steps: int, warmup_ratio: float):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _epoch_batches(n: int, epoch: int, config: Stage2Config, ctx: _Dist) -> list[list[int]]:
    """This rank's micro-batches of one epoch. The seeded permutation is padded by wrapping to a
    whole number of global batches (batch_size x world), so every rank takes the same number of
    equal steps; rank r takes the r-th slice of each global batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
    global_batch = config.batch_size * ctx.world
    steps = math.ceil(n / global_batch)
    order = (order * math.ceil(steps * global_batch / n))[:steps * global_batch]
    return [order[s * global_batch + ctx.rank * config.batch_size:][:config.batch_size] for s in range(steps)]


def weight_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in state_dict order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def explanation_nll(model: Explainer, split: text_data.EncodedSplit, batch_size: int, device,
                    dtype: torch.dtype | None = None, limit: int = 2000):
    """Mean NLL per explanation token (and its perplexity) on the first ``limit`` records,
    under autocast in ``dtype`` (None: in the model's own dtypes)."""
    device = torch.device(device)
    model.eval()
    total, tokens = 0.0, 0
    rows = list(range(min(limit, len(split))))
    for s in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in text_data.training_batch(split, rows[s:s + batch_size],
                                                                      model.pad_token_id).items()}
        with scaling.autocast(device, dtype):
            out = model(**batch, alpha=0.0, beta=0.0, aux_coef=0.0)
        n = int((batch["labels"][:, 1:] != text_data.IGNORE).sum())
        total, tokens = total + float(out["nll"]) * n, tokens + n
    model.train()
    nll = total / max(tokens, 1)
    return {"nll": nll, "perplexity": math.exp(nll)}


def _save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, ctx: _Dist) -> None:
    """Full model and optimizer state (gathered from every rank: call it on all of them), written
    by rank 0."""
    model_state, optimizer_state = scaling.full_state(model, optimizer)
    if not ctx.main:
        return
    payload = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
               "rng": torch.get_rng_state(), **state}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with replacing(path) as partial:  # a crash mid-write leaves the previous checkpoint
        torch.save(payload, partial)


@dataclass
class _Training:
    """Everything one stage-2 training run holds between setup, loop and finish."""

    config: Stage2Config
    ctx: _Dist
    device: torch.device
    run: Run
    stage1_sha256: str
    tokenizer: object
    model: Explainer  # sharded in place under FSDP
    trained: torch.nn.Module  # what the loop calls: the model, or DDP around it
    dtype: torch.dtype | None  # the compute dtype (autocast), None for fp32
    plan: memory.MemoryPlan
    train: text_data.EncodedSplit
    clusters: dict[str, torch.Tensor] | None  # the fixed table, None with reassign_clusters
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    state: dict
    seconds: float = 0.0


def _setup(data: ReviewData, out_dir: Path, config: Stage2Config) -> _Training:
    """Model from stage 1, tokenizer, encoded training split, optimiser and schedule; the state
    of a checkpoint with ``resume`` (loaded with weights_only: a checkpoint cannot run code)."""
    run = Run(out_dir)
    stage1_sha256 = run.stage1_sha256()
    checkpoint_path = run.stage2_checkpoint
    if config.resume and not checkpoint_path.exists():
        raise UserInputError(f"--resume: {checkpoint_path} not found")
    ctx = distributed_context(config.device)
    device = _device(config, ctx)
    if ctx.main:
        run.stage2_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    torch.manual_seed(config.seed)
    tokenizer = _tokenizer(config, data, run.stage2_dir, ctx)
    vae = VaeGmm.from_checkpoint(torch.load(run.stage1_model, weights_only=True, map_location="cpu"))
    model = build_explainer(config, vae, tokenizer)
    dtype = scaling.compute_dtype(model, device)  # of the base as it loaded, before the fp32 masters
    scaling.keep_fp32_master(model)
    if config.gradient_checkpointing:
        scaling.enable_checkpointing(model.lm)
    model = model.to(device)
    clusters = _load_cluster_table(run, data, model.vae, config, ctx)
    train = text_data.encode(data.split("train"), tokenizer, config.max_explanation_tokens, config.sentiment,
                             None if clusters is None else clusters["train"])
    plan = memory.plan_memory(model, world_size=ctx.world, fsdp=config.fsdp, cpu_offload=config.cpu_offload,
                              gradient_checkpointing=config.gradient_checkpointing, micro_batch=config.batch_size,
                              sequence_length=max(len(p) + len(t) for p, t in zip(train.prompts, train.targets,
                                                                                    strict=True)),
                              compute_bytes=2 if dtype is not None else 4)
    if ctx.main:
        print(plan.table(), flush=True)
    trained = model
    if config.fsdp:
        scaling.shard(model, model.lm, dtype, config.cpu_offload)
    elif ctx.world > 1:
        # no buffer changes in training (the VAE's history tables, rotary tables): nothing to
        # broadcast before every step
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    micro_per_epoch = len(_epoch_batches(len(train), 0, config, ctx))
    total_steps = config.epochs * math.ceil(micro_per_epoch / config.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else 3e-3 if config.explainer.base_model is None else 1e-4
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, config.warmup_ratio))
    state = {"epoch": 0, "micro_step": 0, "step": 0, "history": []}
    if config.resume:
        saved = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
        if saved.get("stage1_sha256") != stage1_sha256:
            raise UserInputError(f"--resume: {checkpoint_path} was trained on another stage 1 (re-run since); "
                                 f"train stage 2 from the start")
        scaling.load_full_state(model, optimizer, saved["model"], saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if "cuda_rng" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = {k: saved[k] for k in state}
    return _Training(config, ctx, device, run, stage1_sha256, tokenizer, model, trained, dtype, plan, train, clusters,
                     params, optimizer, scheduler, total_steps, state)


def _loop(t: _Training) -> bool:
    """Train to the end (True), or stop after ``stop_after`` optimizer steps (False, checkpoint written)."""
    config, ctx, state = t.config, t.ctx, t.state
    losses = dict(alpha=config.alpha, beta=config.beta, aux_coef=config.aux_coef)
    bar = Progress(total=t.total_steps, initial=state["step"], desc="stage 2", quiet=not ctx.main)
    steps_this_call, started = 0, time.perf_counter()
    t.model.train()
    for epoch in range(state["epoch"], config.epochs):
        batches = _epoch_batches(len(t.train), epoch, config, ctx)
        while state["micro_step"] < len(batches):
            group = batches[state["micro_step"]:state["micro_step"] + config.grad_accum]
            t0, tokens, sums = time.perf_counter(), 0, {"loss": 0.0, "nll": 0.0, "elbo": 0.0, "aux": 0.0}
            for i, rows in enumerate(group):
                batch = text_data.training_batch(t.train, rows, t.tokenizer.pad_token_id)
                batch = {k: v.to(t.device) for k, v in batch.items()}
                with scaling.grad_sync(t.trained, i == len(group) - 1), scaling.autocast(t.device, t.dtype):
                    out = t.trained(**batch, **losses)
                (out["loss"] / len(group)).backward()
                tokens += int(batch["attention_mask"].sum()) * ctx.world
                for k in sums:
                    sums[k] += float(out[k].detach()) / len(group)
            torch.nn.utils.clip_grad_norm_(t.params, config.clip)
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
            state["micro_step"] += len(group)
            state["step"] += 1
            steps_this_call += 1
            rate = tokens / (time.perf_counter() - t0)
            state["history"].append({**sums, "lr": t.scheduler.get_last_lr()[0], "tokens_per_s": rate})
            bar.set_postfix(loss=f"{sums['loss']:.3f}", nll=f"{sums['nll']:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            done = state["micro_step"] >= len(batches)
            if done:
                state["epoch"], state["micro_step"] = epoch + 1, 0
            stop = config.stop_after and steps_this_call >= config.stop_after and state["step"] < t.total_steps
            if state["step"] % config.checkpoint_every == 0 or done or stop:
                _save_checkpoint(t.run.stage2_checkpoint, t.model, t.optimizer, t.scheduler,
                                 {**state, "stage1_sha256": t.stage1_sha256}, ctx)
            if stop:
                bar.close()
                ctx.barrier()
                return False
            if done:
                break
    bar.close()
    t.seconds = time.perf_counter() - started
    return True


def _unsharded(t: _Training, state: dict) -> Explainer:
    """A plain copy of the (FSDP-sharded) trained model from its full state dict, on this rank's device."""
    model = build_explainer(t.config, VaeGmm(t.model.vae.config), t.tokenizer)
    scaling.keep_fp32_master(model)
    model.load_state_dict(state)
    return model.to(t.device)


def _rank_digests(t: _Training) -> tuple[Explainer | None, list]:
    """The trained model as rank 0 writes it, and the weight digest of every rank's copy: under
    DDP one per rank (they must agree); under FSDP one, of the full weights gathered to rank 0
    (None as the model on the other ranks)."""
    if t.config.fsdp:
        state = scaling.full_model_state(t.model)
        if not t.ctx.main:
            return None, []
        model = _unsharded(t, state)
        return model, [weight_digest(model)]
    digests = [weight_digest(t.model)]
    if t.ctx.world > 1:
        digests = [None] * t.ctx.world
        dist.all_gather_object(digests, weight_digest(t.model))
    return t.model, digests


def _finish(t: _Training, data: ReviewData) -> tuple[Explainer, dict] | None:
    """Check that every rank ended with the same weights; on rank 0 write model.pt, metrics.json,
    the loss curve and the run's record of this stage 2."""
    config, ctx = t.config, t.ctx
    # training's peak, before rank 0 gathers an unsharded copy under FSDP
    peak = torch.cuda.max_memory_allocated(t.device) / memory.GIB if t.device.type == "cuda" else None
    model, digests = _rank_digests(t)
    if not ctx.main:
        return None
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    validation = text_data.encode(data.split("validation"), t.tokenizer, config.max_explanation_tokens,
                                  config.sentiment, None if t.clusters is None else t.clusters["validation"])
    history = t.state["history"]
    train = data.tensors("train")
    now = model.cluster_ids(train["user"], train["item"]).cpu()
    stage1 = stage1_clusters(t.run, data) if t.clusters is None else t.clusters["train"]  # read once per run
    metrics = {"validation": explanation_nll(model, validation, config.batch_size, t.device, t.dtype),
               "routing": "reassigned every step" if t.clusters is None else "fixed stage-1 clusters",
               "clusters_changed_since_stage1": float((now != stage1).float().mean()),
               "steps": t.state["step"], "world_size": ctx.world, "fsdp": config.fsdp, "weight_sha256": digests,
               "train_tokens_per_s": sum(h["tokens_per_s"] for h in history[-50:]) / max(1, len(history[-50:])),
               "seconds_this_call": t.seconds, "final_loss": history[-1] if history else None,
               "memory_plan": t.plan.as_dict(), "peak_cuda_memory_gib": peak}
    torch.save(model.checkpoint(), t.run.stage2_dir / "model.pt")
    (t.run.stage2_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    t.run.record_stage2(config, t.stage1_sha256)
    plots.loss_curves({"total": [h["loss"] for h in history], "explanation NLL": [h["nll"] for h in history],
                       f"ELBO (alpha={config.alpha})": [h["elbo"] for h in history]},
                      t.run.stage2_dir / "loss_curve.png", "stage 2: MoE explainer")
    return model, metrics


def train_stage2(data: ReviewData, out_dir: Path, config: Stage2Config) -> tuple[Explainer, dict] | None:
    """Train stage 2 of the run in ``out_dir`` from its stage1/model.pt. Returns (model, metrics)
    on rank 0, or None when the run stopped early (``stop_after``) or on the other ranks."""
    training = _setup(data, out_dir, config)
    if not _loop(training):
        return None
    return _finish(training, data)
