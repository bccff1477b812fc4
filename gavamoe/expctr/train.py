"""ExpCTR end to end: the ID-only CTR model, the label-free warm-up of the LLM, then R rounds of
(1) GRPO with the LC reward, (2) the CTR model trained on IDs plus explanation embeddings,
(3) GRPO with the IC reward; and the evaluation on the test pairs, all and cold users.

Reported (``metrics.json``), each as AUC and LogLoss:
    id           the DeepFM on user and item IDs alone
    aug          ExpCTR-Aug: the DeepFM with the explanation's embedding as a third field
    llm          ExpCTR-LLM: the LLM's P(yes) given its explanation, Platt-calibrated on training pairs
    aug_shuffled the control: ``aug`` trained and tested with explanations permuted across pairs
    aug_item_shuffled  the control that keeps the item: explanations permuted among the pairs of
                 each item (training and test pairs together), so what is left is what they say
                 of the item, not of the user
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import gavamoe_kernels as gk

from ..errors import UserInputError, check_at_least_one, check_device, check_finite, check_ranges, flag_of
from ..progress import Progress
from . import ctr, prompts, rl
from .data import CtrData
from .encoder import SentenceEncoder
from .llm import ExplanationLM, LlmConfig, build_tokenizer

VARIANTS = ("id", "aug", "llm", "aug_shuffled", "aug_item_shuffled")


@dataclass
class RlConfig:
    rounds: int = 2
    steps: int = 60  # GRPO steps in each of the two RL stages of a round
    batch_pairs: int = 32  # prompts per step
    group: int = 4  # explanations sampled per prompt
    lr: float = 1e-3
    kl_coef: float = 0.05
    temperature: float = 1.0
    reward_form: str = "prob"
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        flag = lambda name: "--rl-lr" if name == "lr" else flag_of(name)
        check_finite(self, flag)
        check_at_least_one(self, ("rounds", "steps", "batch_pairs"))
        if self.group < 2:
            raise UserInputError(f"--group must be at least 2 (GRPO compares samples of one prompt), got {self.group}")
        check_ranges(self, {"lr": "be positive", "temperature": "be positive", "kl_coef": "be non-negative",
                            "seed": "be non-negative"}, flag)
        if self.reward_form not in rl.REWARD_FORMS:
            raise UserInputError(f"--reward-form must be one of {', '.join(rl.REWARD_FORMS)}, got {self.reward_form}")
        check_device(self.device)


def user_clusters(id_model: ctr.DeepFM, num_clusters: int, seed: int) -> torch.Tensor:
    """Each user's cluster for the MoE's gates: a diagonal GMM (gk.fit_gmm) on the ID model's user
    embeddings, argmax of the responsibilities."""
    z = id_model.user.weight.detach().float()
    fit = gk.fit_gmm(z, min(num_clusters, len(z)), seed=seed)
    return gk.gmm_log_responsibilities(z, fit.log_pi, fit.mu, fit.logvar).argmax(1)


def _tensors(data: CtrData, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(data.users[pairs]), torch.as_tensor(data.items[pairs]),
            torch.as_tensor(data.labels[pairs]))


def _formed(texts: list[str]) -> torch.Tensor:
    return torch.tensor([prompts.well_formed(t) for t in texts])


def _folds(num_pairs: int, train: np.ndarray, seed: int) -> np.ndarray:
    """Fold 0 or 1 of each training pair (-1 elsewhere), half and half at random."""
    folds = np.full(num_pairs, -1)
    folds[np.random.default_rng(seed + 3).permutation(train)] = np.arange(len(train)) % 2
    return folds


def _within_items(items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(items)) that moves each position only among the positions of
    its own item."""
    order = np.arange(len(items))
    for item in np.unique(items):
        at = np.flatnonzero(items == item)
        order[at] = at[rng.permutation(len(at))]
    return order


def _fit_ctr(data: CtrData, train: np.ndarray, text: torch.Tensor | None, config: ctr.CtrConfig,
             seed: int) -> tuple[ctr.DeepFM, ctr.FitResult]:
    """A DeepFM on the training pairs, on IDs alone (``text`` None) or with the explanation field."""
    torch.manual_seed(seed)
    model = ctr.DeepFM(data.num_users, data.num_items, config, text_dim=0 if text is None else text.shape[1])
    return model, ctr.fit(model, *_tensors(data, train), config, text=text, seed=seed)


def _platt(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """a, b of sigmoid(a * logit(p) + b) fitted by maximum likelihood (Platt scaling)."""
    x = torch.logit(scores.double().clamp(1e-6, 1 - 1e-6))
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([ab], max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * x + ab[1], labels.double())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(ab[0].detach()), float(ab[1].detach())


def _calibrated(p: torch.Tensor, ab: tuple[float, float]) -> torch.Tensor:
    return torch.sigmoid(ab[0] * torch.logit(p.double().clamp(1e-6, 1 - 1e-6)) + ab[1])


class _Clock:
    """Seconds spent per phase, summed over its calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class _Rl:
    """The policy (LoRA on the warmed-up LLM), the frozen reference and one GRPO stage."""

    def __init__(self, lm: ExplanationLM, config: RlConfig):
        self.lm, self.config = lm, config
        self.reference = copy.deepcopy(lm.model).eval().requires_grad_(False)
        lm.add_lora()
        self.optimizer = torch.optim.Adam([p for p in lm.model.parameters() if p.requires_grad], lr=config.lr)
        self.rng = np.random.default_rng(config.seed + 1)

    def stage(self, data: CtrData, train: np.ndarray, reward, desc: str) -> list[float]:
        """``steps`` GRPO steps on batches of training pairs; ``reward(pairs, texts) -> (N,)``.
        Returns the mean reward of each step."""
        c, lm = self.config, self.lm
        means = []
        bar = Progress(range(c.steps), desc=desc)
        for _ in bar:
            pairs = self.rng.choice(train, size=min(c.batch_pairs, len(train)), replace=False).tolist()
            lm.model.eval()
            completions = lm.sample(data, pairs, group=c.group, temperature=c.temperature)
            repeated = [p for p in pairs for _ in range(c.group)]
            rewards = reward(repeated, lm.decode(completions))
            advantages = rl.group_advantages(rewards, c.group).to(lm.device)
            lm.model.train()
            logp, mask = lm.token_logprobs(lm.model, data, repeated, completions)
            with torch.no_grad():
                ref_logp, _ = lm.token_logprobs(self.reference, data, repeated, completions)
            loss, kl = rl.grpo_loss(logp, ref_logp, mask, advantages, c.kl_coef)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            means.append(float(rewards.mean()))
            bar.set_postfix(reward=f"{means[-1]:.3f}", kl=f"{float(kl):.3f}")
        lm.model.eval()
        return means


def _check_warm_up(texts: list[str], least: float = 0.5) -> None:
    """Warn when fewer than ``least`` of the warmed-up LLM's explanations are in the explanation's
    form: the warm-up failed (a loss spike at its end was seen once), and every later figure of
    the run would be about fragments."""
    formed = float(_formed(texts).float().mean())
    if formed < least:
        warnings.warn(f"after the warm-up only {formed:.0%} of the test explanations are in the explanation's "
                      "form, so RL and ExpCTR-Aug start from fragments; try another --seed or more --warmup-epochs",
                      RuntimeWarning, stacklevel=3)


def explanation_stats(data: CtrData, pairs: np.ndarray, texts: list[str]) -> dict[str, float]:
    """What explanations say: the fraction in the explanation's form; of their genre clauses, the
    fraction whose reading matches the prompt; how often the verdict agrees with the label, over
    all pairs and over positive and negative pairs apart; and, on planted data, how often positive
    and negative pairs' explanations name one of the user's planted liked genres as liked."""
    parsed = [prompts.parse(t) for t in texts]
    clauses = [(p, g, r) for p, x in zip(pairs, parsed, strict=True) if x for g, r in x[0]]
    verdicts = np.array([(x[1] == prompts.SENTIMENTS[0], data.labels[p]) for p, x in zip(pairs, parsed, strict=True)
                         if x], dtype=bool).reshape(-1, 2)
    agree = verdicts[:, 0] == verdicts[:, 1]
    mean = lambda a: float(a.mean()) if len(a) else float("nan")
    stats = {"well_formed": float(np.mean([x is not None for x in parsed])) if parsed else float("nan"),
             "reading_accuracy": mean(np.array([prompts.reading(data, p, g) == r for p, g, r in clauses])),
             "verdict_accuracy": mean(agree), "positive_says_enjoy": mean(verdicts[verdicts[:, 1], 0]),
             "negative_says_dislike": mean(~verdicts[~verdicts[:, 1], 0])}
    if data.liked_genres is not None:
        names = np.array([x is not None and any(r == 1 and g in data.liked_genres[data.users[p]] for g, r in x[0])
                          for p, x in zip(pairs, parsed, strict=True)])
        positive = data.labels[pairs] == 1
        stats["positive_names_liked"], stats["negative_names_liked"] = mean(names[positive]), mean(names[~positive])
    return stats


def _scores(labels: np.ndarray, cold: np.ndarray, predictions: dict[str, np.ndarray]) -> dict[str, dict]:
    out = {}
    for group, keep in (("all", np.ones_like(cold)), ("cold", cold)):
        row = {}
        for name, p in predictions.items():
            row[f"auc_{name}"] = ctr.auc(labels[keep], p[keep])
            row[f"logloss_{name}"] = ctr.logloss(labels[keep], p[keep])
        out[group] = {**row, "pairs": int(keep.sum())}
    return out


def train(data: CtrData, llm_config: LlmConfig, ctr_config: ctr.CtrConfig, config: RlConfig,
          encoder: str = "minilm", out: Path | None = None) -> dict:
    """Run ExpCTR (module docstring); return (and with ``out`` write) the metrics."""
    started, clock = time.perf_counter(), _Clock()
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    train_pairs, test_pairs = data.pairs("train"), data.pairs("test")
    if len(train_pairs) < config.batch_pairs or len(test_pairs) == 0:
        raise UserInputError(f"the data has {len(train_pairs)} training and {len(test_pairs)} test pairs; need at "
                             f"least --batch-pairs={config.batch_pairs} and 1")
    encode = SentenceEncoder(encoder)
    users, items, _ = _tensors(data, test_pairs)

    predictions, fits = {}, {}

    def fit_and_predict(name: str, train_text: torch.Tensor | None, test_text: torch.Tensor | None) -> ctr.DeepFM:
        """The DeepFM ``name`` on the training pairs (IDs alone when the texts are None); its test predictions."""
        with clock("ctr"):
            model, fits[name] = _fit_ctr(data, train_pairs, train_text, ctr_config, config.seed)
        predictions[name] = ctr.predict(model, users, items, test_text).numpy()
        return model

    id_model = fit_and_predict("id", None, None)

    clusters = (user_clusters(id_model, llm_config.num_clusters, config.seed) if llm_config.moe
                else torch.zeros(data.num_users, dtype=torch.long))
    tokenizer = build_tokenizer(data, np.concatenate([train_pairs, test_pairs]), llm_config.history_summary)
    lm = ExplanationLM(llm_config, tokenizer, clusters, device)
    with clock("warm-up"):
        warmup_losses = lm.warm_up(data, train_pairs, config.seed)
    with clock("explain"):
        before = lm.explain(data, test_pairs, desc="explaining (before RL)")
    _check_warm_up(before)
    policy = _Rl(lm, config)
    judge = policy.reference

    def lc(pairs, texts):
        return rl.lc_reward(lm.p_yes(judge, data, pairs, texts), torch.as_tensor(data.labels[pairs]),
                            _formed(texts), config.reward_form)

    folds = _folds(len(data.users), train_pairs, config.seed)
    rounds, curves = [], {"lc": [], "ic": []}
    for r in range(1, config.rounds + 1):
        with clock("rl-lc"):
            curves["lc"].append(policy.stage(data, train_pairs, lc, f"round {r}/{config.rounds}: LC"))
        with clock("explain"):
            texts = encode(lm.explain(data, train_pairs))
        # cross-fitted: a pair's IC reward comes from the model trained on the other fold, so it
        # scores what the explanation says, not the model's memory of that pair
        with clock("ctr"):
            models = [_fit_ctr(data, train_pairs[folds[train_pairs] != k], texts[folds[train_pairs] != k],
                               ctr_config, config.seed)[0] for k in (0, 1)]

        def ic(pairs, texts, models=models):
            users, items, emb = torch.as_tensor(data.users[pairs]), torch.as_tensor(data.items[pairs]), encode(texts)
            fold = torch.as_tensor(folds[pairs])
            p = torch.where(fold == 0, ctr.predict(models[0], users, items, emb),
                            ctr.predict(models[1], users, items, emb))
            return rl.ic_reward(p, torch.as_tensor(data.labels[pairs]), _formed(texts), config.reward_form)

        with clock("rl-ic"):
            curves["ic"].append(policy.stage(data, train_pairs, ic, f"round {r}/{config.rounds}: IC"))
        rounds.append({"round": r, "lc_reward": float(np.mean(curves["lc"][-1])),
                       "ic_reward": float(np.mean(curves["ic"][-1]))})

    with clock("explain"):
        train_texts = lm.explain(data, train_pairs)
        test_texts = lm.explain(data, test_pairs)
    train_emb, test_emb = encode(train_texts), encode(test_texts)
    fit_and_predict("aug", train_emb, test_emb)
    platt = _platt(lm.p_yes(judge, data, train_pairs.tolist(), train_texts),
                   torch.as_tensor(data.labels[train_pairs]))
    predictions["llm"] = _calibrated(lm.p_yes(judge, data, test_pairs.tolist(), test_texts), platt).numpy()
    # the controls: the same explanation embeddings, moved to other pairs
    shuffle = np.random.default_rng(config.seed + 2)
    fit_and_predict("aug_shuffled", train_emb[shuffle.permutation(len(train_emb))],
                    test_emb[shuffle.permutation(len(test_emb))])
    order = _within_items(data.items[np.concatenate([train_pairs, test_pairs])], np.random.default_rng(config.seed + 4))
    moved = torch.cat([train_emb, test_emb])[torch.as_tensor(order)]
    fit_and_predict("aug_item_shuffled", moved[:len(train_pairs)], moved[len(train_pairs):])

    metrics = {**_scores(data.labels[test_pairs], data.cold[data.users[test_pairs]], predictions), "rounds": rounds,
               "ctr_epochs": {name: {"run": f.epochs, "kept": f.best_epoch} for name, f in fits.items()},
               "llm_platt": {"a": platt[0], "b": platt[1]}, "seconds": time.perf_counter() - started,
               "seconds_by_phase": clock.seconds,
               "users": data.num_users, "items": data.num_items, "cold_users": int(data.cold.sum()),
               "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
               "config": {"llm": asdict(llm_config), "ctr": asdict(ctr_config), "rl": asdict(config),
                          "encoder": encoder, "data": data.source}}
    metrics["explanations"] = {"before_rl": explanation_stats(data, test_pairs, before),
                               "after_rl": explanation_stats(data, test_pairs, test_texts)}
    if out is not None:
        _write(out, data, metrics, train_pairs, train_texts, test_pairs, test_texts, curves,
               {"ID-only CTR": fits["id"].losses, "LLM warm-up": warmup_losses})
    return metrics


def _write(out: Path, data: CtrData, metrics: dict, train_pairs, train_texts, test_pairs, test_texts, curves,
           losses) -> None:
    from .. import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "explanations.jsonl", "w", encoding="utf-8") as f:
        for split, pairs, texts in (("train", train_pairs, train_texts), ("test", test_pairs, test_texts)):
            for p, text in zip(pairs, texts, strict=True):
                f.write(json.dumps({"user": data.user_name(int(data.users[p])), "item": data.titles[data.items[p]],
                                    "label": int(data.labels[p]), "split": split, "explanation": text.strip()}) + "\n")
    plots.reward_curves(curves, out / "rewards.png")
    plots.loss_curves(losses, out / "loss_curve.png", "ExpCTR: supervised losses")
