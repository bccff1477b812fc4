"""Stage 1 of GaVaMoE: train the VAE-GMM, assign clusters, write the run's stage1/ folder.

1. pretrain the autoencoder on rating reconstruction (z = mu, no KL);
2. initialise the prior by gavamoe_kernels.fit_gmm on the training latents;
3. train the beta-ELBO (VaDE) with gamma from the fused kernel.

Both phases reconstruct, from each pair's z, its rating and ``context_ratings`` other training
ratings of the same user (VaeGmm's docstring; 0 gives the paper's reconstruction).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import gavamoe_kernels as gk

from . import plots
from .data import ReviewData
from .errors import UserInputError, check_at_least_one, check_device, check_finite, check_ranges
from .metrics import adjusted_rand_index, mae, rmse, user_majority_ari
from .models import VaeGmm, VaeGmmConfig
from .models.vae_gmm import USER_CODES, group_by_user
from .progress import Progress


@dataclass
class Stage1Config:
    num_clusters: int = 4
    embed_dim: int = 768
    latent_dim: int = 128
    # the user vector: "history" (the mean embedding of the user's (item, rating) pairs) or
    # "embedding" (the paper's free embedding per user); VaeGmm's docstring, README "stage 1"
    user_code: str = "history"
    encoder_dim: int | None = 128  # the encoder Transformer's width (None: embed_dim, the paper's)
    # in training, the chance that each rating is left out of its user's vector (user_code
    # "history"): 0.5 lifted 'level' at width 128 from 0.78-0.88 to 0.87-0.91 over three seeds (README, stage 1)
    history_dropout: float = 0.5
    batch_size: int = 256
    # 3e-3 and 10 + 20 epochs: at 1e-3 and 10 + 10 the planted groups of the recovery sets were
    # recovered with ARI 0.65-0.84 (README, stage 1)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pretrain_epochs: int = 10
    epochs: int = 20
    pretrain_batch_size: int | None = None  # None: batch_size
    pretrain_lr: float | None = None  # None: lr
    lr_step_epochs: int = 0  # > 0: the ELBO phase's lr is multiplied by lr_step_gamma every this many epochs
    lr_step_gamma: float = 0.5
    recon_scale: float = 1.0  # weight of the rating reconstruction in the ELBO (the released code: 2 * embed_dim)
    # KL warm-up of the ELBO phase: beta starts here and grows by beta_step every beta_step_epochs up
    # to beta (None: beta throughout)
    beta_start: float | None = None
    beta_step: float = 0.005
    beta_step_epochs: int = 5
    # other ratings of the pair's user that z also reconstructs (0: the paper's own rating only)
    context_ratings: int = 8
    # EM fits of the prior's initial mixture, from different k-means++ seeds; the best lower bound
    # wins (one fit can merge two groups and split a third: README, stage 1)
    gmm_restarts: int = 8
    # The paper's beta = 0.1 over-regularises here: the reconstruction is two 5-way categoricals
    # (a few nats) while the KL sums over 128 latent dimensions, and the ELBO empties clusters
    # (measured: README, stage 1).
    beta: float = 0.01
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        check_finite(self)
        check_at_least_one(self, ("num_clusters", "embed_dim", "latent_dim", "encoder_dim", "batch_size",
                                  "pretrain_batch_size", "beta_step_epochs", "gmm_restarts"))
        check_ranges(self, {**dict.fromkeys(("pretrain_epochs", "epochs", "beta", "weight_decay", "lr_step_epochs",
                                             "beta_start", "beta_step", "context_ratings", "seed"), "be non-negative"),
                            **dict.fromkeys(("lr", "pretrain_lr", "lr_step_gamma", "recon_scale"), "be positive"),
                            "history_dropout": "lie in [0, 1)"})
        if self.user_code not in USER_CODES:
            raise UserInputError(f"--user-code must be one of {', '.join(USER_CODES)}, got {self.user_code!r}")
        heads = VaeGmmConfig.num_heads
        if (self.encoder_dim or self.embed_dim) % heads:
            flag = "--encoder-dim" if self.encoder_dim else "--embed-dim (the encoder's width under --preset paper)"
            raise UserInputError(f"{flag} must be a multiple of the encoder's {heads} heads, "
                                 f"got {self.encoder_dim or self.embed_dim}")
        check_device(self.device)


def vae_config(config: Stage1Config, num_users: int, num_items: int, num_history: int) -> VaeGmmConfig:
    """The VAE of ``config`` for data of this size (``num_history``: its training ratings)."""
    return VaeGmmConfig(num_users, num_items, config.num_clusters, config.embed_dim, config.latent_dim,
                        user_code=config.user_code, num_history=num_history, encoder_dim=config.encoder_dim,
                        history_dropout=config.history_dropout)


def _loader(tensors: dict[str, torch.Tensor], batch_size: int, seed: int) -> DataLoader:
    data = TensorDataset(tensors["user"], tensors["item"], tensors["rating"])
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


class UserContext:
    """Samples, for a batch of pairs, ``size`` training ratings of each pair's user (with
    replacement, seeded): the reconstruction context of VaeGmm. The tables live on ``device`` and
    only the uniform draws come from the (CPU, seeded) generator, so a training step on a GPU
    copies them up and never waits to read the batch's users back."""

    def __init__(self, train: dict[str, torch.Tensor], num_users: int, size: int, seed: int, device):
        order, offsets = group_by_user(train["user"], num_users)
        self.items, self.ratings = train["item"][order].to(device), train["rating"][order].to(device)
        self.counts, self.offsets = offsets.diff().to(device), offsets[:-1].to(device)
        self.size, self.device = size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(items, ratings), each (B, size), for ``users`` (B,) on the tables' device."""
        if self.size == 0:
            return None
        draw = torch.rand(len(users), self.size, generator=self.generator).to(self.device)
        rows = self.offsets[users, None] + (draw * self.counts[users, None]).long()
        return self.items[rows], self.ratings[rows]


def beta_at(config: Stage1Config, epoch: int) -> float:
    """The KL weight of ELBO epoch ``epoch`` (0-based): the warm-up's, capped at beta."""
    if config.beta_start is None:
        return config.beta
    return min(config.beta, config.beta_start + config.beta_step * (epoch // config.beta_step_epochs))


def _run_epochs(model, loader, epochs, loss_fn, desc, lr, weight_decay, device, step_epochs=0,
                gamma=1.0) -> list[float]:
    """AdamW over ``loader`` for ``epochs``; ``loss_fn(users, items, ratings, epoch)``; with
    ``step_epochs`` > 0 the lr is multiplied by ``gamma`` every that many epochs (StepLR)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_epochs, gamma) if step_epochs else None
    losses = []
    model.train()
    for epoch in range(epochs):
        bar = Progress(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False)
        for users, items, ratings in bar:
            loss = loss_fn(users.to(device), items.to(device), ratings.to(device), epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if scheduler is not None:
            scheduler.step()
    return losses


@torch.no_grad()
def evaluate_ratings(model: VaeGmm, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    z = model.latents(tensors["user"], tensors["item"])
    predicted = model.expected_rating(model.rating_logits(z, tensors["item"].to(z.device))).cpu()
    return {"rmse": rmse(predicted, tensors["rating"]), "mae": mae(predicted, tensors["rating"])}


def train_stage1(data: ReviewData, out_dir: Path, config: Stage1Config) -> tuple[VaeGmm, dict]:
    """Train stage 1 on ``data`` and write out_dir/stage1/{model.pt, assignments.csv,
    metrics.json, loss_curve.png, latent_space.png}. Returns the model and the metrics."""
    torch.manual_seed(config.seed)
    stage_dir = Path(out_dir) / "stage1"
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    train = data.tensors("train")
    model = VaeGmm(vae_config(config, data.num_users, data.num_items, len(train["user"])))
    if config.user_code == "history":
        model.set_history(train["user"], train["item"], train["rating"])
    model.to(device)
    context = UserContext(train, data.num_users, config.context_ratings, config.seed, device)
    pretrain = _run_epochs(model, _loader(train, config.pretrain_batch_size or config.batch_size, config.seed),
                           config.pretrain_epochs,
                           lambda u, i, r, _: model.reconstruction_loss(u, i, r, sample=False, context=context(u)),
                           "pretrain", config.pretrain_lr or config.lr, config.weight_decay, device)
    model.eval()
    z_train = model.latents(train["user"], train["item"])
    fits = [gk.fit_gmm(z_train, config.num_clusters, seed=config.seed * 1000 + r) for r in range(config.gmm_restarts)]
    params = max(fits, key=lambda fit: fit.lower_bound)
    model.init_prior(params)
    elbo = _run_epochs(model, _loader(train, config.batch_size, config.seed), config.epochs,
                       lambda u, i, r, epoch: model.elbo_loss(u, i, r, beta_at(config, epoch), config.recon_scale,
                                                              context(u))["loss"],
                       "elbo", config.lr, config.weight_decay, device, config.lr_step_epochs, config.lr_step_gamma)

    clusters = model.assign_clusters(train["user"], train["item"]).cpu()
    metrics = {"test": evaluate_ratings(model, data.tensors("test")),
               "validation": evaluate_ratings(model, data.tensors("validation")),
               "cluster_sizes": torch.bincount(clusters, minlength=config.num_clusters).tolist(),
               "gmm_init_lower_bound": params.lower_bound,
               "config": asdict(config)}
    if data.has_groups:
        metrics["ari"] = adjusted_rand_index(clusters.numpy(), train["group"].numpy())
        metrics["ari_users"] = user_majority_ari(train["user"].numpy(), clusters.numpy(), train["group"].numpy())
    torch.save(model.checkpoint(), stage_dir / "model.pt")
    with open(stage_dir / "assignments.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "cluster"])
        for u, i, c in zip(train["user"].tolist(), train["item"].tolist(), clusters.tolist(), strict=True):
            writer.writerow([data.users[u], data.items[i], c])
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots.loss_curves({"autoencoder pretraining": pretrain, f"beta-ELBO (beta={config.beta})": elbo},
                      stage_dir / "loss_curve.png", "stage 1: VAE-GMM")
    plots.latent_space(model.latents(train["user"], train["item"]), clusters, stage_dir / "latent_space.png",
                       "stage 1 latent space (PCA), coloured by cluster")
    return model, metrics
