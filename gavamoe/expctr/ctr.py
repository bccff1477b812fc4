"""The ID-based CTR model of ExpCTR: DeepFM (Guo et al. 2017) over the user and item ID fields,
with an optional third field from the explanation's sentence embedding (ExpCTR-Aug).

    fields  e_user, e_item (, e_expl = W x_expl + b)      each (B, d)
    logit   = w0 + w_user + w_item  +  sum_{f<g} <e_f, e_g>  +  MLP(dropout(concat(e_f)))

Training (``fit``) stops early: a seeded ``validation`` fraction of the training pairs is held
out, and the weights of the epoch with the lowest held-out LogLoss are kept, so that models with
and without the explanation field are each trained to their own best point (``patience = 0``
trains all ``epochs`` on every pair instead). Also the paper's two metrics, AUC and LogLoss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserInputError, check_at_least_one, check_finite, check_ranges


@dataclass
class CtrConfig:
    dim: int = 16
    hidden: int = 64
    epochs: int = 100  # at most, with early stopping
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    dropout: float = 0.5  # on the MLP's input in training, as in DeepFM's paper
    patience: int = 10  # epochs without a better held-out LogLoss before stopping; 0: no early stopping
    validation: float = 0.1  # fraction of the training pairs held out for early stopping

    def __post_init__(self):
        flag = lambda name: "--ctr-" + name.replace("_", "-")
        check_finite(self, flag)
        check_at_least_one(self, ("dim", "hidden", "epochs", "batch_size"), flag)
        check_ranges(self, {"lr": "be positive", "weight_decay": "be non-negative", "patience": "be non-negative",
                            "validation": "lie in (0, 1)", "dropout": "lie in [0, 1)"}, flag)


@dataclass
class FitResult:
    losses: list[float]  # training loss per step
    epochs: int  # epochs run
    best_epoch: int  # the epoch whose weights were kept (1-based)
    validation_logloss: list[float]  # held-out LogLoss per epoch; empty without early stopping


class DeepFM(nn.Module):
    def __init__(self, num_users: int, num_items: int, config: CtrConfig, text_dim: int = 0):
        super().__init__()
        d = config.dim
        self.user, self.item = nn.Embedding(num_users, d), nn.Embedding(num_items, d)
        self.user_bias, self.item_bias = nn.Embedding(num_users, 1), nn.Embedding(num_items, 1)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.05)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)
        self.text = nn.Linear(text_dim, d) if text_dim else None
        fields = 3 if text_dim else 2
        self.mlp = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(fields * d, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, 1))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, users: torch.Tensor, items: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """users, items: (B,) int64; text: (B, text_dim) float or None -> click logits (B,)."""
        if (text is None) != (self.text is None):
            raise ValueError("text must be given exactly when the model was built with text_dim > 0")
        fields = [self.user(users), self.item(items)]
        if self.text is not None:
            fields.append(self.text(text))
        stacked = torch.stack(fields, 1)  # [B, F, d]
        pairwise = 0.5 * (stacked.sum(1).square() - stacked.square().sum(1)).sum(1)  # sum_{f<g} <e_f, e_g>
        first = self.bias + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0]
        return first + pairwise + self.mlp(stacked.flatten(1))[:, 0]


def fit(model: DeepFM, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, config: CtrConfig,
        text: torch.Tensor | None = None, seed: int = 0) -> FitResult:
    """Adam on the binary cross-entropy with early stopping (module docstring); the model is left
    with the kept epoch's weights, in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(users), generator=generator)
    held = round(config.validation * len(users)) if config.patience else 0
    if config.patience and not 0 < held < len(users):
        raise UserInputError(f"--ctr-validation {config.validation} of {len(users)} training pairs leaves no "
                             "held-out or no training pair")
    fit_rows, held_rows = rows[held:], rows[:held]
    pick = lambda r: (users[r], items[r], None if text is None else text[r])
    result = FitResult([], 0, config.epochs, [])
    best_state, best = None, float("inf")
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = fit_rows[torch.randperm(len(fit_rows), generator=generator)]
        for s in range(0, len(order), config.batch_size):
            step = order[s:s + config.batch_size]
            loss = F.binary_cross_entropy_with_logits(model(*pick(step)), labels[step].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(float(loss.detach()))
        result.epochs = epoch
        if not held:
            continue
        held_loss = logloss(labels[held_rows].numpy(), predict(model, *pick(held_rows)).numpy())
        result.validation_logloss.append(held_loss)
        if held_loss < best:
            best, result.best_epoch = held_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - result.best_epoch >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


@torch.no_grad()
def predict(model: DeepFM, users: torch.Tensor, items: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
    """Click probabilities (B,)."""
    model.eval()
    return torch.sigmoid(model(users, items, text))


def auc(labels, scores) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with mid-ranks). NaN without both classes."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, run, count = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(count) - 0.5 * (count - 1))[run]  # 1-based mid-rank of each tied run
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
