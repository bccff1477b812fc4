"""Metrics: rating errors, clustering agreement, and the explanation-text metrics."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np


def rmse(predicted, target) -> float:
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else math.nan


def mae(predicted, target) -> float:
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return float(np.mean(np.abs(p - t))) if p.size else math.nan


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions, about 0 for
    independent ones; invariant to renaming the labels."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in shape: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = lambda x: (x * (x - 1) // 2).sum()
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) // 2)
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


# PEPLER's post-processing before scoring: clitics and punctuation become tokens of their own,
# runs of a punctuation mark collapse to one, ':' counts as ',' and ';' as '.'.
_CLITICS = re.compile(r"('s|'m|'ve|n't|'re|'d|'ll)")
_PUNCTUATION = [(re.compile(r"\("), " ( "), (re.compile(r"\)"), " ) "), (re.compile(r",+"), " , "),
                (re.compile(r":+"), " , "), (re.compile(r";+"), " . "), (re.compile(r"\.+"), " . "),
                (re.compile(r"!+"), " ! "), (re.compile(r"\?+"), " ? ")]


def tokenize(text: str) -> list[str]:
    """Split a generated or reference explanation into the tokens the metrics count."""
    text = _CLITICS.sub(r" \1", text)
    for pattern, spaced in _PUNCTUATION:
        text = pattern.sub(spaced, text)
    return text.split()


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def bleu(references: list[list[str]], hypotheses: list[list[str]], max_order: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) without smoothing, one reference per hypothesis, in percent:
    clipped n-gram matches summed over the corpus for orders 1..max_order, geometric mean of the
    precisions with equal weights (0 when any is 0), brevity penalty exp(1 - r/c) when c <= r."""
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_len += len(ref)
        hyp_len += len(hyp)
        for n in range(1, max_order + 1):
            overlap = Counter(_ngrams(hyp, n)) & Counter(_ngrams(ref, n))
            matches[n - 1] += sum(overlap.values())
            possible[n - 1] += max(0, len(hyp) - n + 1)
    precisions = [m / p if p else 0.0 for m, p in zip(matches, possible, strict=True)]
    if min(precisions) <= 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * geo_mean * brevity


def _f1(overlap: float, n_hyp: int, n_ref: int) -> float:
    precision = overlap / n_hyp if n_hyp else 0.0
    recall = overlap / n_ref if n_ref else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge(references: list[list[str]], hypotheses: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-scores in percent, averaged over the pairs, as the tf-seq2seq ROUGE that
    PETER and PEPLER use: ROUGE-N over the *sets* of n-grams of each sentence; ROUGE-L from the
    LCS with F = (1 + b^2) R P / (R + b^2 P) and b = P / R."""
    scores = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, hyp in zip(references, hypotheses, strict=True):
        for n in (1, 2):
            h, r = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
            scores[f"rouge{n}"].append(_f1(len(h & r), len(h), len(r)))
        lcs = _lcs_length(hyp, ref)
        if lcs == 0:
            scores["rougeL"].append(0.0)
            continue
        r, p = lcs / len(ref), lcs / len(hyp)
        b2 = (p / r) ** 2
        scores["rougeL"].append((1 + b2) * r * p / (r + b2 * p))
    return {k: 100 * float(np.mean(v)) if v else 0.0 for k, v in scores.items()}


def distinct(hypotheses: list[list[str]], n: int) -> float:
    """Distinct-n in percent: distinct n-grams over all n-grams of all generated texts."""
    grams = [g for hyp in hypotheses for g in _ngrams(hyp, n)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def unique_sentence_ratio(hypotheses: list[list[str]]) -> float:
    """USR: distinct generated token sequences over all of them (a fraction)."""
    return len({tuple(h) for h in hypotheses}) / len(hypotheses) if hypotheses else 0.0


def detect_features(tokens: list[str], feature_set: set[str]) -> set[str]:
    """The features a text mentions: a feature counts when its words appear as consecutive
    tokens (for one-word features, PETER's token lookup)."""
    found = set(tokens) & feature_set
    longest = max((f.count(" ") + 1 for f in feature_set), default=1)
    for n in range(2, longest + 1):
        found |= {" ".join(g) for g in _ngrams(tokens, n)} & feature_set
    return found


def feature_metrics(hypotheses: list[list[str]], features: list[list[str]], feature_set: set[str]) -> dict:
    """FMR: share of texts that mention one of their record's features; FCR: share of the
    feature vocabulary mentioned anywhere; DIV: mean over all pairs of texts of the number of
    features both mention (lower is more diverse), from per-feature counts in O(n)."""
    detected = [detect_features(h, feature_set) for h in hypotheses]
    n = len(detected)
    fmr = sum(bool(d & set(f)) for d, f in zip(detected, features, strict=True)) / n if n else 0.0
    fcr = len(set().union(*detected)) / len(feature_set) if feature_set and n else 0.0
    counts = Counter(f for d in detected for f in d)
    pairs = n * (n - 1) / 2
    div = sum(c * (c - 1) / 2 for c in counts.values()) / pairs if pairs else 0.0
    return {"fmr": fmr, "fcr": fcr, "div": div}


def text_metrics(references: list[str], generated: list[str], features: list[list[str]],
                 feature_set: set[str] | None = None) -> dict[str, float]:
    """Every text metric of DESIGN.md except BERTScore. ``features[i]``: the record's own
    feature(s); ``feature_set``: the feature vocabulary (default: every feature in ``features``)."""
    if len(references) != len(generated) or len(generated) != len(features):
        raise ValueError(f"references ({len(references)}), generated ({len(generated)}) and features "
                         f"({len(features)}) must have one entry per record")
    refs, hyps = [tokenize(t) for t in references], [tokenize(t) for t in generated]
    feature_set = feature_set if feature_set is not None else {f for fs in features for f in fs}
    return {"bleu1": bleu(refs, hyps, 1), "bleu4": bleu(refs, hyps, 4), **rouge(refs, hyps),
            "distinct1": distinct(hyps, 1), "distinct2": distinct(hyps, 2), "usr": unique_sentence_ratio(hyps),
            **feature_metrics(hyps, features, feature_set)}


@functools.lru_cache(maxsize=2)
def _encoder(model_path: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_path).is_dir():
        raise ValueError(f"BERTScore model path {model_path} is not a local folder")
    return AutoTokenizer.from_pretrained(model_path), AutoModel.from_pretrained(model_path).to(device).eval()


def bertscore(references: list[str], generated: list[str], model_path: str, batch_size: int = 128,
              device: str = "cpu") -> dict[str, float]:
    """BERTScore (Zhang et al. 2020) P/R/F, fractions, averaged over pairs: greedy cosine matching
    of the last-layer token embeddings of a local encoder (special tokens left out; no idf, no
    baseline rescaling). Nothing is downloaded: ``model_path`` must be a local folder."""
    pairs = bertscore_pairs(references, generated, model_path, batch_size, device)
    return {k: float(v.mean()) for k, v in pairs.items()}


def bertscore_pairs(references: list[str], generated: list[str], model_path: str, batch_size: int = 128,
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """BERTScore P/R/F of every pair (see :func:`bertscore`), as float64 arrays."""
    import torch

    tokenizer, model = _encoder(str(model_path), device)

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                          return_special_tokens_mask=True).to(device)
        special = batch.pop("special_tokens_mask").bool()
        with torch.no_grad():
            h = model(**batch).last_hidden_state.float()
        return torch.nn.functional.normalize(h, dim=-1), batch["attention_mask"].bool() & ~special

    p_all, r_all = [], []
    for s in range(0, len(generated), batch_size):
        hyp, hyp_mask = embed(generated[s:s + batch_size])
        ref, ref_mask = embed(references[s:s + batch_size])
        sim = hyp @ ref.transpose(1, 2)  # [B, hyp tokens, ref tokens]
        sim = sim.masked_fill(~ref_mask[:, None, :], -2).masked_fill(~hyp_mask[:, :, None], -2)
        best_for_hyp = sim.max(2).values  # [B, hyp tokens]
        best_for_ref = sim.max(1).values  # [B, ref tokens]
        p_all.append((best_for_hyp * hyp_mask).sum(1) / hyp_mask.sum(1).clamp(min=1))
        r_all.append((best_for_ref * ref_mask).sum(1) / ref_mask.sum(1).clamp(min=1))
    p, r = torch.cat(p_all).double(), torch.cat(r_all).double()
    f = torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))
    return {"bertscore_p": p.numpy(), "bertscore_r": r.numpy(), "bertscore_f": f.numpy()}
