"""Metrics: rating errors, clustering agreement, and the explanation-text metrics."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
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


def user_majority_ari(users, clusters, groups) -> float:
    """ARI of each user's majority cluster (ties to the lower cluster) against the user's group,
    one vote per user: the agreement of the clusters with planted *user* groups."""
    users, clusters, groups = np.asarray(users), np.asarray(clusters), np.asarray(groups)
    ids, inverse = np.unique(users, return_inverse=True)
    votes = np.zeros((len(ids), int(clusters.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(votes, (inverse, clusters), 1)
    group = np.zeros(len(ids), dtype=groups.dtype)
    group[inverse] = groups
    return adjusted_rand_index(votes.argmax(1), group)


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


def bleu(references: list[list[str]], hypotheses: list[list[str]], max_order: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU (Papineni et al. 2002), one reference per hypothesis, in percent: clipped n-gram
    matches summed over the corpus for orders 1..max_order, geometric mean of the precisions with
    equal weights (0 when any is 0), brevity penalty exp(1 - r/c) when c <= r. ``smooth``: every
    precision is (matches + 1) / (possible + 1) (Lin and Och 2004), as the compute_bleu of PETER's
    code does with smooth=True, which the released GaVaMoE code passes; PETER and PEPLER do not."""
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
    if smooth:
        precisions = [(m + 1) / (p + 1) for m, p in zip(matches, possible, strict=True)]
    else:
        precisions = [m / p if p else 0.0 for m, p in zip(matches, possible, strict=True)]
    if min(precisions) <= 0 or hyp_len == 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * geo_mean * brevity


def _prf(overlap: float, n_hyp: int, n_ref: int) -> tuple[float, float, float]:
    """(precision, recall, F1) of an overlap between n_hyp and n_ref items."""
    precision = overlap / n_hyp if n_hyp else 0.0
    recall = overlap / n_ref if n_ref else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge(references: list[list[str]], hypotheses: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L in percent, averaged over the pairs, as the tf-seq2seq ROUGE that PETER and
    PEPLER use: ROUGE-N over the *sets* of n-grams of each sentence; ROUGE-L from the LCS with
    F = (1 + b^2) R P / (R + b^2 P) and b = P / R. Keys rouge1 / rouge2 / rougeL are the F-scores
    (DESIGN.md), with _p and _r for precision and recall (PETER reports all three)."""
    scores: dict[str, list[float]] = {f"{name}{part}": [] for name in ("rouge1", "rouge2", "rougeL")
                                      for part in ("", "_p", "_r")}
    for ref, hyp in zip(references, hypotheses, strict=True):
        for n in (1, 2):
            h, r = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
            p, rec, f = _prf(len(h & r), len(h), len(r))
            scores[f"rouge{n}"].append(f)
            scores[f"rouge{n}_p"].append(p)
            scores[f"rouge{n}_r"].append(rec)
        lcs = _lcs_length(hyp, ref)
        r_lcs, p_lcs = (lcs / len(ref), lcs / len(hyp)) if lcs else (0.0, 0.0)
        b2 = (p_lcs / r_lcs) ** 2 if lcs else 0.0
        scores["rougeL"].append((1 + b2) * r_lcs * p_lcs / (r_lcs + b2 * p_lcs) if lcs else 0.0)
        scores["rougeL_p"].append(p_lcs)
        scores["rougeL_r"].append(r_lcs)
    return {k: 100 * float(np.mean(v)) if v else 0.0 for k, v in scores.items()}


def distinct(hypotheses: list[list[str]], n: int) -> float:
    """Distinct-n, corpus level, in percent: distinct n-grams over all n-grams of all texts pooled."""
    grams = [g for hyp in hypotheses for g in _ngrams(hyp, n)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def distinct_per_sentence(hypotheses: list[list[str]], n: int) -> float:
    """Distinct-n averaged over sentences, in percent, as the distinct_n package (which the
    released GaVaMoE code imports) computes it: per text, distinct n-grams over its token count
    (0 for an empty text), then the mean."""
    per_text = [len(set(_ngrams(h, n))) / len(h) if h else 0.0 for h in hypotheses]
    return 100 * float(np.mean(per_text)) if per_text else 0.0


def unique_sentence_ratio(hypotheses: list[list[str]]) -> float:
    """USR: distinct generated token sequences over all of them (a fraction)."""
    return len({tuple(h) for h in hypotheses}) / len(hypotheses) if hypotheses else 0.0


FEATURE_MATCHES = ("phrase", "peter")


def detect_features(tokens: list[str], feature_set: set[str], match: str = "phrase") -> set[str]:
    """The features a text mentions. "phrase": a feature counts when its words appear as
    consecutive tokens. "peter": PETER's feature_detect, a single token found in the vocabulary
    (a feature of several words is never found)."""
    found = set(tokens) & feature_set
    if match == "peter":
        return found
    longest = max((f.count(" ") + 1 for f in feature_set), default=1)
    for n in range(2, longest + 1):
        found |= {" ".join(g) for g in _ngrams(tokens, n)} & feature_set
    return found


def feature_metrics(hypotheses: list[list[str]], features: list[list[str]], feature_set: set[str],
                    match: str = "phrase") -> dict:
    """FMR: share of texts that mention one of their record's features; FCR: share of the
    feature vocabulary mentioned anywhere; DIV: mean over all pairs of texts of the number of
    features both mention (lower is more diverse), from per-feature counts in O(n) (PETER sums
    the pairs in O(n^2): the same number). ``match``: see :func:`detect_features`."""
    if match not in FEATURE_MATCHES:
        raise ValueError(f"match must be one of {FEATURE_MATCHES}, got {match!r}")
    detected = [detect_features(h, feature_set, match) for h in hypotheses]
    n = len(detected)
    fmr = sum(bool(d & set(f)) for d, f in zip(detected, features, strict=True)) / n if n else 0.0
    fcr = len(set().union(*detected)) / len(feature_set) if feature_set and n else 0.0
    counts = Counter(f for d in detected for f in d)
    pairs = n * (n - 1) / 2
    div = sum(c * (c - 1) / 2 for c in counts.values()) / pairs if pairs else 0.0
    return {"fmr": fmr, "fcr": fcr, "div": div}


def text_metrics(references: list[str], generated: list[str], features: list[list[str]],
                 feature_set: set[str] | None = None, bleu_smooth: bool = False,
                 feature_match: str = "phrase") -> dict[str, float]:
    """Every text metric of DESIGN.md except BERTScore. ``features[i]``: the record's own
    feature(s); ``feature_set``: the feature vocabulary (default: every feature in ``features``)."""
    if len(references) != len(generated) or len(generated) != len(features):
        raise ValueError(f"references ({len(references)}), generated ({len(generated)}) and features "
                         f"({len(features)}) must have one entry per record")
    refs, hyps = [tokenize(t) for t in references], [tokenize(t) for t in generated]
    feature_set = feature_set if feature_set is not None else {f for fs in features for f in fs}
    return {"bleu1": bleu(refs, hyps, 1, bleu_smooth), "bleu4": bleu(refs, hyps, 4, bleu_smooth),
            **rouge(refs, hyps), "distinct1": distinct(hyps, 1), "distinct2": distinct(hyps, 2),
            "distinct1_per_sentence": distinct_per_sentence(hyps, 1),
            "distinct2_per_sentence": distinct_per_sentence(hyps, 2), "usr": unique_sentence_ratio(hyps),
            **feature_metrics(hyps, features, feature_set, feature_match)}


def bertscore_layer(model_path: str, layer: int | None = None) -> int:
    """The encoder layer BERTScore reads: ``layer``, checked against the model's depth; by default
    the bert-score package's choice for a model it knows by the folder's name (roberta-large: 17),
    else the last layer."""
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(model_path).num_hidden_layers
    if layer is None:
        return model2layers.get(Path(model_path).name, depth)
    if not 0 <= layer <= depth:
        raise ValueError(f"BERTScore layer {layer} is outside 0..{depth} of {model_path}")
    return layer


def bertscore_baseline(model_path: str, baseline: str | None = None) -> str:
    """The baseline file for rescaling: ``baseline``, or the bert-score package's English file for
    the folder's name (roberta-large, bert-base-uncased, ...). A missing file is an error (the
    package itself would only warn and leave the scores unrescaled)."""
    import bert_score

    path = Path(baseline) if baseline else (Path(bert_score.__file__).parent / "rescale_baseline" / "en"
                                            / f"{Path(model_path).name}.tsv")
    if not path.is_file():
        raise ValueError(f"no BERTScore baseline at {path}: name the encoder's folder as the bert-score package "
                         f"does (roberta-large, ...) or give a baseline file (one row per layer: LAYER,P,R,F)")
    return str(path)


def _idf_weights(references: list[str], tokenizer) -> dict[int, float]:
    """The bert-score package's idf over ``references``: log((M + 1) / (df + 1)) per token id, M
    the number of references (an empty one holds only the special tokens, which every text has,
    so their weight is 0), log(M + 1) for a token no reference holds."""
    from bert_score.utils import sent_encode

    counts = Counter(t for ref in references for t in set(sent_encode(tokenizer, ref) if ref.strip() else
                                                          [tokenizer.cls_token_id, tokenizer.sep_token_id]))
    weights = defaultdict(lambda: math.log(len(references) + 1))
    weights.update({t: math.log((len(references) + 1) / (c + 1)) for t, c in counts.items()})
    return weights


def bertscore_pairs(references: list[str], generated: list[str], model_path: str, layer: int | None = None,
                    idf: bool = False, rescale: bool = False, baseline: str | None = None, batch_size: int = 64,
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """BERTScore (Zhang et al. 2020) P/R/F of every pair, as float64 arrays, computed by the
    bert-score package: greedy cosine matching of the token embeddings of one layer of a local
    encoder (:func:`bertscore_layer`), optionally idf-weighted (idf from ``references``, as the
    package does) and rescaled with a baseline, (score - b) / (1 - b) (:func:`bertscore_baseline`).
    A pair with an empty side scores 0 before rescaling, as in the package (scored here: the
    package's empty-text path fails on transformers 5 tokenizers). Nothing is downloaded."""
    if not Path(model_path).is_dir():
        raise ValueError(f"BERTScore model path {model_path} is not a local folder")
    import bert_score
    import torch

    chosen = bertscore_layer(model_path, layer)
    raw = torch.zeros(len(generated), 3, dtype=torch.float64)
    full = [i for i, (ref, gen) in enumerate(zip(references, generated, strict=True)) if ref.strip() and gen.strip()]
    if full:
        weights = _idf_weights(references, bert_score.utils.get_tokenizer(model_path, True)) if idf else False
        scores = bert_score.score([generated[i] for i in full], [references[i] for i in full], model_type=model_path,
                                  num_layers=chosen, idf=weights, batch_size=batch_size, device=device, nthreads=0,
                                  lang="en", use_fast_tokenizer=True)
        raw[full] = torch.stack(scores, 1).double()
    if rescale:
        with open(bertscore_baseline(model_path, baseline)) as f:
            rows = list(csv.reader(f))[1:]
        b = torch.tensor([float(x) for x in rows[chosen][1:4]], dtype=torch.float64)
        raw = (raw - b) / (1 - b)
    return {"bertscore_p": raw[:, 0].numpy(), "bertscore_r": raw[:, 1].numpy(), "bertscore_f": raw[:, 2].numpy()}


def bertscore(references: list[str], generated: list[str], model_path: str, **options) -> dict[str, float]:
    """BERTScore P/R/F averaged over the pairs (fractions); ``options`` as :func:`bertscore_pairs`."""
    pairs = bertscore_pairs(references, generated, model_path, **options)
    return {k: float(v.mean()) if v.size else 0.0 for k, v in pairs.items()}
