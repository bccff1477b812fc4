"""Training and evaluation of FAME / SASRec: cross-entropy over all items at every position of the
training sequences, Adam, early stopping on validation NDCG@10, full-ranking HR/NDCG on the
best epoch's weights; a popularity baseline for scale.

Writes RUN/{metrics.json, config.json, model.pt, loss_curve.png} and, for FAME, gates.png (the
head gate by planted facet on synthetic data, each head's expert weights, and how sharply each
gate chooses per user).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import plots
from ..errors import check_at_least_one, check_device, check_finite, check_ranges
from ..progress import Progress
from ..runs import replacing
from .data import Sequences, Split, leave_one_out, planted_oracle_scores
from .metrics import gate_sharpness, normalized_entropy, ranking_metrics, target_ranks
from .metrics import normalized_mutual_information as nmi
from .model import SeqRec, SeqRecConfig


@dataclass
class TrainConfig:
    epochs: int = 200
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        check_finite(self)
        check_at_least_one(self, ("epochs", "patience", "batch_size"))
        check_ranges(self, {"lr": "be positive", "weight_decay": "be non-negative", "seed": "be non-negative"})
        check_device(self.device)


@torch.no_grad()
def evaluate(model: SeqRec, split: Split, batch_size: int, device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Full-ranking metrics of the last position's prediction, and for FAME the weights there:
    ``{"heads": (n, H) head gate, "experts": (n, H, N)}`` (empty for SASRec)."""
    model.eval()
    ranks, weights = [], {"heads": [], "experts": []}
    for s in range(0, len(split.targets), batch_size):
        inputs = split.inputs[s:s + batch_size].to(device)
        scores = model.log_probs(inputs, last_only=True)
        ranks.append(target_ranks(scores, split.targets[s:s + batch_size].to(device)).cpu())
        if model.fame is not None:
            weights["heads"].append(model.head_weights.cpu())
            weights["experts"].append(model.expert_weights.cpu())
    model.train()
    return ranking_metrics(torch.cat(ranks)), {k: torch.cat(v) for k, v in weights.items() if v}


def popularity(data: Sequences, splits: dict[str, Split]) -> dict[str, dict[str, float]]:
    """Items scored by their count in the training sequences (the same list for every user)."""
    counts = torch.bincount(torch.tensor([i for s in data.items for i in s[:-2]], dtype=torch.long),
                            minlength=data.num_items + 1)[1:].double()
    out = {}
    for name in ("validation", "test"):
        targets = splits[name].targets
        out[name] = ranking_metrics(target_ranks(counts.expand(len(targets), -1), targets))
    return out


def oracle(data: Sequences, splits: dict[str, Split], seed: int) -> dict[str, dict[str, float]]:
    """The planted-truth ranker's metrics (data.planted_oracle_scores): about the most a model can
    reach on the planted data, since it knows what a model has to infer from the history."""
    generator = torch.Generator().manual_seed(seed)
    return {name: ranking_metrics(target_ranks(planted_oracle_scores(data, splits[name], generator),
                                               splits[name].targets))
            for name in ("validation", "test")}


def train(data: Sequences, model_config: SeqRecConfig, config: TrainConfig, out: Path | None = None,
          command: list[str] | None = None) -> dict:
    """Train with early stopping; return (and with ``out`` write) the metrics. ``command``, the flags
    of the command line, goes into the config (``compare`` reuses a run finished with the same ones)."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    splits = leave_one_out(data, model_config.max_len)
    model = SeqRec(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_split = splits["train"]
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, best_epoch, losses, history = -1.0, None, 0, [], []
    started = time.perf_counter()
    bar = Progress(range(config.epochs), desc=model_config.model)
    for epoch in bar:
        order = torch.randperm(len(train_split.inputs), generator=generator)
        total, count = 0.0, 0
        for s in range(0, len(order), config.batch_size):
            rows = order[s:s + config.batch_size]
            inputs, targets = train_split.inputs[rows].to(device), train_split.targets[rows].to(device)
            keep = targets != 0
            if not keep.any():  # users with 3 items have no training target: nll_loss of nothing is NaN
                continue
            loss = F.nll_loss(model.log_probs(inputs, where=keep), targets[keep] - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value, n = float(loss.detach()), int(keep.sum())
            losses.append(value)
            total, count = total + value * n, count + n
        validation, _ = evaluate(model, splits["validation"], 1024, device)
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), **validation})
        if validation["ndcg@10"] > best:
            best, best_state, best_epoch = validation["ndcg@10"], copy.deepcopy(model.state_dict()), epoch + 1
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}", val_ndcg10=f"{validation['ndcg@10']:.4f}",
                        best=f"{best:.4f} (epoch {best_epoch})")
        if epoch + 1 - best_epoch >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    validation, _ = evaluate(model, splits["validation"], 1024, device)
    test, weights = evaluate(model, splits["test"], 1024, device)
    metrics = {"model": model_config.model, "test": test, "validation": validation, "best_epoch": best_epoch,
               "epochs_run": len(history), "seconds": time.perf_counter() - started,
               "popularity": popularity(data, splits), "history": history,
               "users": len(data), "items": data.num_items, "dropped_users": data.dropped_users,
               "config": {"model": asdict(model_config), "train": asdict(config), "data": data.source}}
    if data.synthetic is not None:
        metrics["config"]["synthetic"] = data.synthetic
    if command is not None:
        metrics["config"]["command"] = command
    floor = metrics["popularity"]["validation"]["ndcg@10"]
    if validation["ndcg@10"] <= floor:
        warnings.warn(f"{model_config.model} ends at validation NDCG@10 {validation['ndcg@10']:.4f}, not above the "
                      f"popularity baseline's {floor:.4f}: it has learned no more than item counts "
                      f"(best epoch {best_epoch}); a smaller --batch-size, a larger --patience or --lr may help",
                      RuntimeWarning, stacklevel=2)
    if data.user_liked is not None:
        metrics["oracle"] = oracle(data, splits, config.seed)
    if weights:
        metrics["gate_sharpness"] = gate_sharpness(weights["heads"], weights["experts"])
    if weights and data.user_facet is not None:
        metrics["head_gate_nmi"] = nmi(weights["heads"].argmax(1).numpy(), data.user_facet)
    if out is not None:
        _write(out, model, metrics, losses, weights, data)
    return metrics


def _write(out: Path, model: SeqRec, metrics: dict, losses: list[float], weights: dict[str, torch.Tensor],
           data: Sequences) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(metrics["config"], indent=2))
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, out / "model.pt")
    plots.loss_curves({"training cross-entropy": losses}, out / "loss_curve.png", f"{metrics['model']}: loss")
    if weights:  # FAME: the test users' weights at the last position
        plot_gates(weights, data, out / "gates.png")
    with replacing(out / "metrics.json") as partial:  # last and whole: its presence means the run finished
        partial.write_text(json.dumps(metrics, indent=2))


def plot_gates(weights: dict[str, torch.Tensor], data: Sequences, path: Path) -> None:
    """gates.png from the test users' weights (``evaluate``): the head gate, by planted facet when
    the data has one, each head's mean expert weights, and each gate's per-user entropy."""
    gates, experts, by_facet = weights["heads"], weights["experts"], None
    if data.user_facet is not None:
        facets = np.asarray(data.user_facet)
        by_facet = torch.stack([gates[facets == f].mean(0) if (facets == f).any() else torch.zeros(gates.shape[1])
                                for f in range(int(facets.max()) + 1)])
    entropies = {"head gate": normalized_entropy(gates),
                 **{f"head {h}'s experts": normalized_entropy(experts[:, h]) for h in range(experts.shape[1])}}
    plots.gate_weights(gates.mean(0), by_facet, experts.mean(0), entropies, path)
