"""The RL of ExpCTR: GRPO (Shao et al. 2024), one on-policy update per batch of sampled groups.

For each prompt, G explanations are sampled; each gets a scalar reward r. The advantage of a
sample is its reward standardised within its group,
    A_i = (r_i - mean_g r) / (std_g r + eps),
so no value network is needed. Per token t of sample i, with pi the policy and pi_ref the frozen
warmed-up model,
    loss_i = mean_t [ -A_i * log pi(y_t) + beta * kl_t ],
    kl_t   = exp(log pi_ref(y_t) - log pi(y_t)) - (log pi_ref(y_t) - log pi(y_t)) - 1,
(the non-negative k3 estimator of KL(pi || pi_ref)), and the loss is the mean over samples. The
samples come from the current policy and are used for one step, so PPO's probability ratio is 1
and its clipping never acts; it is left out.

And the two rewards, each the probability that a predictor gives the pair's true label:
LC (the LLM reading its own explanation) and IC (the CTR model fed the explanation). An
explanation that is not in the explanation's form (``prompts.well_formed``) gets the lowest
reward instead: without that, the policy drifts into fragments that carry no verdict (seen in a
run at lr 2e-3).
"""

from __future__ import annotations

import math

import torch

REWARD_FORMS = ("prob", "logprob")


def label_reward(p_click: torch.Tensor, labels: torch.Tensor, form: str = "prob") -> torch.Tensor:
    """p(true label) = p_click if the label is 1 else 1 - p_click ("prob", in [0, 1]), or its
    log ("logprob", clamped at log 1e-6). p_click, labels: (N,) -> (N,) fp32."""
    if form not in REWARD_FORMS:
        raise ValueError(f"form must be one of {REWARD_FORMS}, got {form!r}")
    p_click = p_click.float()
    p = torch.where(labels.bool(), p_click, 1 - p_click)
    return p if form == "prob" else p.clamp_min(1e-6).log()


def _formed(reward: torch.Tensor, well_formed: torch.Tensor, form: str) -> torch.Tensor:
    floor = 0.0 if form == "prob" else math.log(1e-6)
    return torch.where(well_formed.to(reward.device), reward, torch.full_like(reward, floor))


def lc_reward(p_yes: torch.Tensor, labels: torch.Tensor, well_formed: torch.Tensor, form: str = "prob") -> torch.Tensor:
    """LC alignment: the LLM, given its explanation, says yes with probability p_yes (N,).
    An explanation that is not well formed (bool (N,)) gets the lowest reward."""
    return _formed(label_reward(p_yes, labels, form), well_formed, form)


def ic_reward(p_click: torch.Tensor, labels: torch.Tensor, well_formed: torch.Tensor,
              form: str = "prob") -> torch.Tensor:
    """IC alignment: the ID-based CTR model fed the explanation's embedding predicts p_click (N,).
    An explanation that is not well formed (bool (N,)) gets the lowest reward."""
    return _formed(label_reward(p_click, labels, form), well_formed, form)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards (B * G,) in pair-major order -> advantages (B * G,), standardised per group
    (population std); a group whose rewards are all equal gets advantage 0."""
    if group < 1 or rewards.numel() % group:
        raise ValueError(f"rewards ({rewards.numel()}) must be a whole number of groups of {group}")
    r = rewards.float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, correction=0) + eps)).flatten()


def grpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logp, ref_logp, mask: (N, L) per-token log-probs under the policy (with gradient) and the
    reference, and which tokens are real; advantages (N,). Returns (loss, mean KL estimate)."""
    mask = mask.float()
    delta = ref_logp.detach() - logp
    kl = delta.exp() - delta - 1
    per_token = -advantages[:, None] * logp + beta * kl
    count = mask.sum(1).clamp_min(1)
    loss = ((per_token * mask).sum(1) / count).mean()
    return loss, ((kl * mask).sum(1) / count).mean().detach()
