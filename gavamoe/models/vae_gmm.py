"""Stage 1 of GaVaMoE: a VAE over (user, item) pairs with a Gaussian-mixture prior (VaDE).

Encoder: a user vector and the item's embedding -> two-layer Transformer encoder over the pair ->
mu, logvar of z. Decoder: MLP (z, an item's embedding) -> that item's rating. Prior: K diagonal
Gaussians (log_pi, mu_c, logvar_c). The clusters' responsibilities gamma come from the fused
kernel (gavamoe_kernels.gmm_log_responsibilities), in log space, so they never underflow.

Rating likelihood: categorical over the five rating values 1..5 (as the reference code
does); the predicted rating is the expectation under that distribution (used for RMSE/MAE).

Reconstruction (our deviation from the paper, README "stage 1"): the paper decodes only the
pair's own rating from z, so z need hold no more than that rating, and the clusters follow rating
levels rather than users. Here z of (u, i) also reconstructs ``context`` other ratings of the same
user, (u, j) -> r_uj through the decoder given item j, so z must carry the user's taste and the
clusters can follow user groups (README, stage 1: the recovery table). ``context=None`` is the
paper's reconstruction.

User vector (our deviation, README "stage 1"): the paper learns a free embedding per user
(``user_code="embedding"``). By default (``"history"``) a user's vector is the mean, over the user's
training ratings, of a learnt embedding of each (item, rating) pair, as SVD++ pools a user's
items: every row is shared by all users who gave that item that rating, so a user with 16 ratings
is placed among the users who rated alike instead of by 16 gradient steps on a free vector. The
tables of training ratings are buffers (``set_history``), saved with the model. In training, each
of a user's ratings is left out of the mean with probability ``history_dropout``: the context
ratings that z reconstructs are among the user's own ratings, and without the dropout the
embedding learns to hand them through rather than to place the user among users alike. The encoder
Transformer runs at ``encoder_dim`` (the embeddings are projected to it), so its width and
stability do not change with the embedding width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gavamoe_kernels as gk

NUM_RATINGS = 5


@dataclass
class VaeGmmConfig:
    num_users: int
    num_items: int
    num_clusters: int = 4
    embed_dim: int = 768
    latent_dim: int = 128
    num_heads: int = 8
    num_layers: int = 2
    decoder_hidden: int = 256
    dropout: float = 0.1
    user_code: str = "history"  # "history" (module docstring) or "embedding" (the paper's free embedding per user)
    num_history: int = 0  # training ratings in the history tables (user_code "history"; set_history fills them)
    encoder_dim: int | None = 128  # width of the encoder Transformer (None: embed_dim, the paper's)
    history_dropout: float = 0.5  # in training, the chance that each rating is left out of a user's vector

    @classmethod
    def from_saved(cls, saved: dict) -> VaeGmmConfig:
        """The config of a checkpoint; one saved before user_code existed had the paper's model, and
        one saved before history_dropout existed was trained without it."""
        return cls(**{"user_code": "embedding", "encoder_dim": None, "history_dropout": 0.0, **saved})


USER_CODES = ("history", "embedding")


class VaeGmm(nn.Module):
    def __init__(self, config: VaeGmmConfig):
        super().__init__()
        self.config = config
        c = config
        width = c.encoder_dim or c.embed_dim
        if width % c.num_heads:
            raise ValueError(f"the encoder width {width} must be a multiple of num_heads={c.num_heads}")
        if c.user_code not in USER_CODES:
            raise ValueError(f"user_code must be one of {USER_CODES}, got {c.user_code!r}")
        if not 0 <= c.history_dropout < 1:
            raise ValueError(f"history_dropout must lie in [0, 1), got {c.history_dropout}")
        if c.user_code == "history":
            # row item * NUM_RATINGS + rating class; the users' rows in CSR form
            user_table = self.history_embedding = nn.Embedding(c.num_items * NUM_RATINGS, c.embed_dim)
            self.register_buffer("history_rows", torch.zeros(c.num_history, dtype=torch.long))
            self.register_buffer("history_offsets", torch.zeros(c.num_users + 1, dtype=torch.long))
        else:
            user_table = self.user_embedding = nn.Embedding(c.num_users, c.embed_dim)
        self.item_embedding = nn.Embedding(c.num_items, c.embed_dim)
        nn.init.normal_(user_table.weight, std=0.1)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        self.to_encoder = nn.Linear(c.embed_dim, width) if width != c.embed_dim else nn.Identity()
        layer = nn.TransformerEncoderLayer(width, c.num_heads, 2 * width, c.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.to_mu = nn.Linear(2 * width, c.latent_dim)
        self.to_logvar = nn.Linear(2 * width, c.latent_dim)
        # pretraining uses z = mu and never trains this head: start the posterior narrow
        # (std 0.14) so that sampling in the ELBO phase does not drown the pretrained signal
        nn.init.zeros_(self.to_logvar.weight)
        nn.init.constant_(self.to_logvar.bias, -4.0)
        self.decoder_z = nn.Linear(c.latent_dim, c.decoder_hidden)
        self.decoder_item = nn.Linear(c.embed_dim, c.decoder_hidden, bias=False)
        self.decoder = nn.Sequential(nn.GELU(), nn.Linear(c.decoder_hidden, NUM_RATINGS))
        self.log_pi = nn.Parameter(torch.zeros(c.num_clusters))
        self.mu_c = nn.Parameter(torch.randn(c.num_clusters, c.latent_dim))
        self.logvar_c = nn.Parameter(torch.zeros(c.num_clusters, c.latent_dim))

    @torch.no_grad()
    def set_history(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor) -> None:
        """Fill the history tables (user_code "history") from the training ratings: users, items
        (N,) int64 and ratings (N,), N = config.num_history."""
        c = self.config
        if c.user_code != "history":
            raise ValueError(f"set_history needs user_code='history', this model has {c.user_code!r}")
        if not len(users) == len(items) == len(ratings) == c.num_history:
            raise ValueError(f"set_history takes num_history={c.num_history} ratings, got users {len(users)}, "
                             f"items {len(items)}, ratings {len(ratings)}")
        if len(users) and (users.min() < 0 or users.max() >= c.num_users or items.min() < 0
                           or items.max() >= c.num_items):
            raise ValueError(f"users must lie in [0, {c.num_users}) and items in [0, {c.num_items})")
        order, offsets = group_by_user(users, c.num_users)
        self.history_rows.copy_(items[order] * NUM_RATINGS + rating_class(ratings[order]))
        self.history_offsets.copy_(offsets)

    def user_vector(self, users: torch.Tensor) -> torch.Tensor:
        """The users' vectors (B, embed_dim): the mean history embedding of each user's training
        ratings (zero for a user without any), or the free embedding (user_code "embedding"). In
        training mode each rating is left out with probability config.history_dropout (the mean is
        over those kept; zero where none is)."""
        if self.config.user_code == "embedding":
            return self.user_embedding(users)
        start, end = self.history_offsets[users], self.history_offsets[users + 1]
        count = end - start
        segment = torch.repeat_interleave(torch.arange(len(users), device=users.device), count)
        first = torch.cumsum(count, 0) - count  # each user's first position in the flat list
        rows = self.history_rows[(start - first)[segment] + torch.arange(len(segment), device=users.device)]
        pooled = self.history_embedding(rows)  # [sum(count), E]
        if self.training and self.config.history_dropout:
            kept = (torch.rand(len(rows), device=rows.device) >= self.config.history_dropout).to(pooled.dtype)
            pooled = pooled * kept[:, None]
            count = kept.new_zeros(len(users)).index_add_(0, segment, kept)
        total = pooled.new_zeros(len(users), pooled.shape[-1]).index_add_(0, segment, pooled)
        return total / count.clamp_min(1)[:, None].to(total.dtype)

    def encode(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | user, item); each (B, latent_dim)."""
        pair = torch.stack([self.user_vector(users), self.item_embedding(items)], dim=1)  # [B, 2, E]
        h = self.encoder(self.to_encoder(pair)).flatten(1)  # [B, 2 * encoder width]
        return self.to_mu(h), self.to_logvar(h).clamp(-10, 10)

    def rating_logits(self, z: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits over ratings 1..5 of ``items`` from ``z``: z (B, D) with items (B,) -> (B, 5), or
        items (B, M) -> (B, M, 5)."""
        h = self.decoder_z(z)
        if items.dim() == 2:
            h = h[:, None]
        return self.decoder(h + self.decoder_item(self.item_embedding(items)))

    def _reconstruction(self, z, items, ratings, context) -> torch.Tensor:
        """Cross-entropy of the pair's rating, plus, with ``context`` = (items (B, M), ratings
        (B, M)) of the same users, the mean cross-entropy of those ratings."""
        loss = F.cross_entropy(self.rating_logits(z, items), rating_class(ratings))
        if context is not None:
            other_items, other_ratings = context
            logits = self.rating_logits(z, other_items)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), rating_class(other_ratings).flatten())
        return loss

    @staticmethod
    def expected_rating(logits: torch.Tensor) -> torch.Tensor:
        values = torch.arange(1, NUM_RATINGS + 1, device=logits.device, dtype=torch.float32)
        return torch.softmax(logits.float(), -1) @ values

    def prior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised log_pi, mu_c, logvar_c)."""
        return torch.log_softmax(self.log_pi, 0), self.mu_c, self.logvar_c

    def log_responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """log gamma (B, K) = log p(c | z) under the prior, from the fused kernel."""
        return gk.gmm_log_responsibilities(z, *self.prior())

    def reconstruction_loss(self, users, items, ratings, sample: bool = True, context=None) -> torch.Tensor:
        """Autoencoder pretraining: cross-entropy of the rating classes from z (mu when not
        sampling); ``context`` as in the module docstring."""
        mu, logvar = self.encode(users, items)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self._reconstruction(z, items, ratings, context)

    def elbo_loss(self, users, items, ratings, beta: float = 0.1, recon_scale: float = 1.0,
                  context=None) -> dict[str, torch.Tensor]:
        """beta-ELBO (VaDE): loss = -recon_scale * E_q log p(r | z) + beta * KL(q(z, c | x) || p(z, c)),
        the reconstruction with ``context`` as in the module docstring.

        KL = 0.5 sum_c gamma_c sum_d (logvar_c + exp(logvar_q - logvar_c) + (mu_q - mu_c)^2 / var_c)
             - sum_c gamma_c (log pi_c - log gamma_c) - 0.5 sum_d (1 + logvar_q),
        with gamma = p(c | z) at the sampled z. Returns loss, reconstruction and kl (batch means)."""
        mu, logvar = self.encode(users, items)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self._reconstruction(z, items, ratings, context)
        log_pi, mu_c, logvar_c = self.prior()
        log_gamma = gk.gmm_log_responsibilities(z, log_pi, mu_c, logvar_c)  # [B, K]
        gamma = torch.exp(log_gamma)
        inv_var_c = torch.exp(-logvar_c)  # [K, D]
        per_cluster = (logvar_c[None] + torch.exp(logvar[:, None] - logvar_c[None])
                       + (mu[:, None] - mu_c[None]).square() * inv_var_c[None]).sum(-1)  # [B, K]
        kl = (0.5 * (gamma * per_cluster).sum(-1) - (gamma * (log_pi[None] - log_gamma)).sum(-1)
              - 0.5 * (1 + logvar).sum(-1)).mean()
        return {"loss": recon_scale * recon + beta * kl, "reconstruction": recon, "kl": kl}

    @torch.no_grad()
    def latents(self, users: torch.Tensor, items: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Posterior means mu (N, latent_dim) of many pairs, in batches."""
        device = self.log_pi.device
        out = [self.encode(users[i:i + batch_size].to(device), items[i:i + batch_size].to(device))[0]
               for i in range(0, len(users), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.latent_dim, device=device)

    @torch.no_grad()
    def assign_clusters(self, users: torch.Tensor, items: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Cluster of each (user, item) pair: argmax_c gamma at z = mu, in fp32 with autocast off
        (so that a bf16 training step and generation give a pair the same cluster). Works for
        unseen pairs of known users and items. (N,) int64 on the model's device."""
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(self.log_pi.device.type, enabled=False):
                z = self.latents(users, items, batch_size)
                return self.log_responsibilities(z).argmax(-1) if len(z) else z.new_empty(0, dtype=torch.long)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def init_prior(self, params: gk.GmmParams) -> None:
        self.log_pi.copy_(params.log_pi)
        self.mu_c.copy_(params.mu)
        self.logvar_c.copy_(params.logvar)

    def checkpoint(self) -> dict:
        return {"config": asdict(self.config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> VaeGmm:
        model = cls(VaeGmmConfig.from_saved(checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model


def group_by_user(users: torch.Tensor, num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The records grouped by user: ``order`` (N,) sorts them by user (stably), and user u's
    records are order[offsets[u]:offsets[u + 1]] (offsets (num_users + 1,), CSR form)."""
    counts = torch.bincount(users, minlength=num_users)
    return torch.argsort(users, stable=True), F.pad(torch.cumsum(counts, 0), (1, 0))


def rating_class(ratings: torch.Tensor) -> torch.Tensor:
    """Ratings 1..5 (any float) -> class indices 0..4."""
    return (ratings.round().clamp(1, NUM_RATINGS) - 1).long()
