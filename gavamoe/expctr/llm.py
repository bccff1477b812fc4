"""The explanation LLM of ExpCTR: the embedded tiny LLaMA of GaVaMoE (optionally with its
cluster-gated MoE, one gate per user cluster), a tokenizer trained on the data's texts, the
label-free warm-up, sampling with per-token log-probabilities, and the LLM's own click
prediction from its explanation.

The warm-up stands in for pretraining: the paper starts from a pretrained LLM that already
writes sentences, reads a user's history and reads "the user would enjoy it" as a yes. The tiny
LLaMA knows no language, so before any RL it is trained on explanations in the explanation's form
with the true readings of the prompt and a common-sense verdict (``prompts.common_sense_verdict``:
the readings' lean with probability ``warmup_prior``, else a coin flip) and, after the question,
the answer that verdict states. Nothing in the warm-up depends on the pairs' labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gavamoe_kernels as gk

from ..data.text import left_pad, train_tokenizer
from ..errors import UserInputError, check_at_least_one, check_finite, check_ranges
from ..models.explainer import ExplainerConfig, add_lora, tiny_llama
from ..progress import Progress
from . import prompts
from .data import CtrData

MAX_PROMPT_TOKENS = 448


@dataclass
class LlmConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    dense_intermediate: int = 344
    moe: bool = False  # every MLP a cluster-gated MoE routed by the user's cluster
    num_experts: int = 8
    top_k: int = 2
    num_clusters: int = 4
    lora_rank: int = 8
    max_new_tokens: int = 24
    warmup_epochs: int = 3
    # how often the warm-up's verdict follows the readings (prompts.common_sense_verdict)
    warmup_prior: float = 0.5
    # the warm-up explanations' readings: the prompt's, or at random (prompts.warmup_explanation)
    warmup_readings: str = "prompt"
    # with warmup_readings "hedged": how often a warm-up reading is "a new genre" whatever the prompt says
    warmup_hedge: float = 0.6
    warmup_lr: float = 3e-3
    batch_size: int = 64
    # the prompt adds the history's liked/disliked counts of the target's genres (prompts.prompt)
    history_summary: bool = True

    def __post_init__(self):
        check_finite(self)
        check_at_least_one(self, ("hidden_size", "num_layers", "num_heads", "dense_intermediate", "num_experts",
                                  "top_k", "num_clusters", "lora_rank", "max_new_tokens", "warmup_epochs",
                                  "batch_size"))
        if self.top_k > self.num_experts:
            raise UserInputError(f"--top-k must be at most --num-experts={self.num_experts}, got {self.top_k}")
        check_ranges(self, {"warmup_lr": "be positive", "warmup_prior": "lie in [0, 1]",
                            "warmup_hedge": "lie in [0, 1]"})
        if self.warmup_readings not in prompts.WARMUP_READINGS:
            raise UserInputError(f"--warmup-readings must be one of {', '.join(prompts.WARMUP_READINGS)}, got "
                                 f"{self.warmup_readings}")


def build_tokenizer(data: CtrData, pairs: np.ndarray, history_summary: bool = True):
    """A byte-level BPE tokenizer trained on the prompts, every explanation form and the answers;
    each answer must be one token (the judge reads one logit per answer)."""
    genres = sorted({g for gs in data.genres for g in gs} | {prompts.NO_GENRE})
    texts = [prompts.prompt(data, int(p), history_summary) for p in pairs]
    texts += [prompts.explanation([(g, r)], s) + prompts.QUESTION + a for g in genres for r in prompts.READINGS
              for s, a in zip(prompts.SENTIMENTS, prompts.ANSWERS, strict=True)]
    tokenizer = train_tokenizer(texts, vocab_size=2000)
    for answer in prompts.ANSWERS:
        if len(tokenizer(answer, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"the answer {answer!r} is not one token of the trained tokenizer")
    return tokenizer


class ExplanationLM:
    """The LLM, its tokenizer and each user's cluster (the MoE's gate; all 0 without ``moe``)."""

    def __init__(self, config: LlmConfig, tokenizer, user_clusters: torch.Tensor, device: torch.device):
        self.config, self.tokenizer, self.device = config, tokenizer, device
        shape = ExplainerConfig(hidden_size=config.hidden_size, num_layers=config.num_layers,
                                num_heads=config.num_heads, dense_intermediate=config.dense_intermediate,
                                max_positions=MAX_PROMPT_TOKENS + 64)
        self.model: nn.Module = tiny_llama(shape, len(tokenizer), tokenizer)
        if config.moe:
            gk.replace_mlp_with_moe(self.model, config.num_experts, config.num_clusters, config.top_k,
                                    init="dense_split")
        self.model.to(device)
        self.user_clusters = user_clusters.to(device)
        self.answer_ids = [tokenizer(a, add_special_tokens=False).input_ids[0] for a in prompts.ANSWERS]
        self._prompts: dict[int, list[int]] = {}

    def add_lora(self) -> None:
        """Freeze the warmed-up weights; RL trains LoRA on the attention (and the MoE layers)."""
        add_lora(self.model, self.config.lora_rank)

    def routing(self, users: torch.Tensor) -> dict:
        return {"cluster_ids": self.user_clusters[users]} if self.config.moe else {}

    def prompt_ids(self, data: CtrData, pair: int) -> list[int]:
        if pair not in self._prompts:
            text = prompts.prompt(data, pair, self.config.history_summary)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            self._prompts[pair] = [self.tokenizer.bos_token_id, *ids[-MAX_PROMPT_TOKENS:]]
        return self._prompts[pair]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    def _logits(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.routing(users)).logits

    def warm_up(self, data: CtrData, pairs: np.ndarray, seed: int) -> list[float]:
        """Full training on prompt -> explanation with the true readings and the common-sense
        verdict -> question -> the answer that verdict states (see the module docstring); returns
        the loss per step."""
        rng = np.random.default_rng(seed)
        question = self._text_ids(prompts.QUESTION)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.warmup_lr, weight_decay=0.0)
        losses = []
        self.model.train()
        steps = self.config.warmup_epochs * -(-len(pairs) // self.config.batch_size)
        bar = Progress(total=steps, desc="warm-up")
        for _ in range(self.config.warmup_epochs):
            order = rng.permutation(pairs)
            for s in range(0, len(order), self.config.batch_size):
                chunk = order[s:s + self.config.batch_size].tolist()
                rows, targets = [], []
                for p in chunk:
                    text = prompts.warmup_explanation(data, p, rng, self.config.warmup_prior,
                                                      self.config.warmup_readings, self.config.warmup_hedge)
                    head = self.prompt_ids(data, p)
                    tail = [*self._text_ids(text), self.tokenizer.eos_token_id]
                    answer = self.answer_ids[prompts.ANSWERS.index(prompts.judge_answer(text))]
                    rows.append([*head, *tail, *question, answer])
                    # learn the explanation (with its end) and the answer; not the prompt or question
                    targets.append([-100] * len(head) + tail + [-100] * len(question) + [answer])
                ids, mask = self._left_pad(rows)
                labels = torch.full_like(ids, -100)
                for b, t in enumerate(targets):
                    labels[b, ids.shape[1] - len(t):] = torch.tensor(t)
                users = torch.as_tensor(data.users[chunk], device=self.device)
                logits = self._logits(self.model, ids, mask, users)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
        bar.close()
        self.model.eval()
        return losses

    @torch.no_grad()
    def sample(self, data: CtrData, pairs: list[int], group: int = 1, greedy: bool = False,
               temperature: float = 1.0) -> list[list[int]]:
        """``group`` explanations per pair (pair-major order), each a list of token ids ending at
        (and including) EOS when one was generated."""
        rows = [self.prompt_ids(data, p) for p in pairs for _ in range(group)]
        ids, mask = self._left_pad(rows)
        users = torch.as_tensor(np.repeat(data.users[pairs], group), device=self.device)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                          "top_p": 1.0}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.config.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                  **sampling, **self.routing(users))[:, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        return [r[:r.index(eos) + 1] if eos in r else r for r in out]

    def decode(self, completions: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(completions, skip_special_tokens=True)

    def explain(self, data: CtrData, pairs: np.ndarray, batch_size: int = 256, desc: str = "explaining") -> list[str]:
        """Greedy explanations of ``pairs``."""
        texts = []
        for s in Progress(range(0, len(pairs), batch_size), desc=desc, leave=False):
            texts += self.decode(self.sample(data, pairs[s:s + batch_size].tolist(), greedy=True))
        return texts

    def token_logprobs(self, model: nn.Module, data: CtrData, pairs: list[int],
                       completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(token | prompt, earlier tokens) of each completion token under ``model``:
        (N, L) log-probs and (N, L) mask of real tokens (completions right-aligned)."""
        heads = [self.prompt_ids(data, p) for p in pairs]
        ids, mask = self._left_pad([[*h, *c] for h, c in zip(heads, completions, strict=True)])
        users = torch.as_tensor(data.users[pairs], device=self.device)
        logits = self._logits(model, ids, mask, users)[:, :-1]
        width = max(max(len(c) for c in completions), 1)
        logp = torch.log_softmax(logits[:, -width:].float(), -1).gather(-1, ids[:, -width:, None])[..., 0]
        real = torch.zeros_like(logp, dtype=torch.bool)
        for b, c in enumerate(completions):
            real[b, width - len(c):] = True
        return logp, real

    @torch.no_grad()
    def p_yes(self, model: nn.Module, data: CtrData, pairs: list[int], texts: list[str],
              batch_size: int = 256) -> torch.Tensor:
        """The LLM's own click prediction: P(yes) against P(no) after prompt + explanation + question."""
        out = []
        question = self._text_ids(prompts.QUESTION)
        for s in range(0, len(pairs), batch_size):
            chunk, chunk_texts = pairs[s:s + batch_size], texts[s:s + batch_size]
            rows = [[*self.prompt_ids(data, p), *self._text_ids(t), self.tokenizer.eos_token_id, *question]
                    for p, t in zip(chunk, chunk_texts, strict=True)]
            ids, mask = self._left_pad(rows)
            users = torch.as_tensor(data.users[chunk], device=self.device)
            last = self._logits(model, ids, mask, users)[:, -1, self.answer_ids].float()  # [B, 2]: yes, no
            out.append(torch.softmax(last, -1)[:, 0].cpu())
        return torch.cat(out) if out else torch.empty(0)
