"""Figures of a run: loss curves, the latent space coloured by cluster, FAME's gate weights and
seed spread, ExpCTR's rewards."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def loss_curves(phases: dict[str, list[float]], path: Path, title: str) -> None:
    """One panel per phase (e.g. pretraining, ELBO), loss against step."""
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], phases.items(), strict=True):
        ax.plot(values, lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latent_space(z: torch.Tensor, clusters: torch.Tensor, path: Path, title: str, max_points: int = 5000) -> None:
    """2-D PCA of latents, one colour per cluster (the paper's Fig. 5)."""
    z, clusters = z.float().cpu(), clusters.cpu()
    if len(z) > max_points:
        keep = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:max_points]
        z, clusters = z[keep], clusters[keep]
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ v[:2].T
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in clusters.unique().tolist():
        sel = clusters == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.5, label=f"cluster {c} ({int(sel.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gate_weights(head_mean: torch.Tensor, head_by_facet: torch.Tensor | None, experts: torch.Tensor,
                 entropies: dict[str, torch.Tensor], path: Path) -> None:
    """FAME's gates: the head gate's mean weight per head (by planted facet when known: facets x
    heads), each head's mean expert weights (heads x experts), and, since a mean of 1/N hides
    whether each user's weights are sharp or uniform, the spread over users of each gate's
    normalised entropy (name -> (n,) in [0, 1])."""
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    if head_by_facet is not None:
        image = left.imshow(head_by_facet.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        left.set_ylabel("planted facet of the user")
        left.set_yticks(range(head_by_facet.shape[0]))
        fig.colorbar(image, ax=left)
    else:
        left.bar(range(len(head_mean)), head_mean.numpy())
        left.set_ylabel("mean weight")
    left.set_xlabel("head")
    left.set_xticks(range(len(head_mean)))
    left.set_title("head gate (test users, last position)")
    image = middle.imshow(experts.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    middle.set_xlabel("expert")
    middle.set_ylabel("head")
    middle.set_xticks(range(experts.shape[1]))
    middle.set_yticks(range(experts.shape[0]))
    middle.set_title("expert weights per head (mean)")
    fig.colorbar(image, ax=middle)
    bins = [i / 40 for i in range(41)]
    for name, values in entropies.items():
        right.hist(values.numpy(), bins=bins, histtype="step", lw=1.2, label=name)
    right.set_xlabel("normalised entropy per user (0 one-hot, 1 uniform)")
    right.set_ylabel("users")
    right.set_title("how sharply each gate chooses")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reward_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    """ExpCTR's RL: the mean reward of each GRPO step, one panel per reward (LC, IC), rounds
    one after another and marked."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, rounds) in zip(axes[0], curves.items(), strict=True):
        start = 0
        for r, values in enumerate(rounds, start=1):
            ax.plot(range(start, start + len(values)), values, lw=0.8, label=f"round {r}")
            start += len(values)
        ax.set_title(f"{name.upper()} reward")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_spread(summary: dict[str, dict], metrics: tuple[str, ...], path: Path, title: str) -> None:
    """One panel per metric: each model's value on every seed (dots) and their mean ± std (bar), so
    that a gap between models can be read against the spread over seeds. ``summary[model][metric]``
    holds ``values``, ``mean`` and ``std``."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for x, name in enumerate(summary):
            s = summary[name][metric]
            ax.errorbar(x, s["mean"], yerr=s["std"], fmt="_", markersize=18, capsize=6, color="k", lw=1)
            ax.scatter([x + 0.15] * len(s["values"]), s["values"], s=14, alpha=0.7, zorder=3)
        ax.set_xticks(range(len(summary)), list(summary), rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
