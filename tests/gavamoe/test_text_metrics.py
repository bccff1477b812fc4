"""Explanation metrics on cases worked out by hand, and identical predictions scoring 100."""

from __future__ import annotations

import itertools
import math

import pytest

from gavamoe.metrics import (
    bertscore,
    bleu,
    detect_features,
    distinct,
    feature_metrics,
    rouge,
    text_metrics,
    tokenize,
    unique_sentence_ratio,
)


def test_tokenize_splits_clitics_and_punctuation():
    assert tokenize("It's great, isn't it!! (really)...") == \
        ["It", "'s", "great", ",", "is", "n't", "it", "!", "(", "really", ")", "."]
    assert tokenize("a: b; c") == ["a", ",", "b", ".", "c"]


def test_bleu_by_hand():
    refs = [["a", "b", "c", "d", "e"], ["a", "b", "c", "d"]]
    hyps = [["a", "b", "c", "d", "e"], ["a", "b", "c", "x"]]
    # corpus precisions: 1-grams 8/9, 2-grams 6/7, 3-grams 4/5, 4-grams 2/3; c = r = 9, no penalty
    assert bleu(refs, hyps, 1) == pytest.approx(100 * 8 / 9)
    assert bleu(refs, hyps, 4) == pytest.approx(100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25)
    # a short hypothesis: all five words match, brevity penalty exp(1 - 6/5); no 4-gram -> BLEU-4 0
    short = [["the", "cat", "on", "the", "mat"]]
    ref = [["the", "cat", "sat", "on", "the", "mat"]]
    assert bleu(ref, short, 1) == pytest.approx(100 * math.exp(-0.2))
    assert bleu(ref, short, 4) == 0.0
    # clipping: "the the the" against "the cat" matches one "the"
    assert bleu([["the", "cat"]], [["the", "the", "the"]], 1) == pytest.approx(100 / 3)


def test_rouge_counts_ngram_sets_and_uses_the_lcs_f():
    got = rouge([["a", "b", "c"]], [["a", "b", "a"]])
    # unigram sets {a,b} vs {a,b,c}: P 1, R 2/3 -> F 0.8 (a count-based ROUGE would give 2/3)
    assert got["rouge1"] == pytest.approx(80.0)
    assert got["rouge2"] == pytest.approx(50.0)  # {ab, ba} vs {ab, bc}
    assert got["rougeL"] == pytest.approx(100 * 2 / 3)  # LCS 2 of 3 each way
    # unequal P and R for ROUGE-L: LCS 2, R = 2/4, P = 2/2, b = P/R = 2 -> (1+4)*0.5*1/(0.5+4*1)
    got = rouge([["a", "x", "b", "y"]], [["a", "b"]])
    assert got["rougeL"] == pytest.approx(100 * 5 * 0.5 / 4.5)
    # averaged over pairs; an empty hypothesis scores 0
    got = rouge([["a"], ["a"]], [["a"], []])
    assert got["rouge1"] == pytest.approx(50.0) and got["rougeL"] == pytest.approx(50.0)


def test_distinct_and_usr_by_hand():
    hyps = [["a", "b", "a"], ["a", "c"]]
    assert distinct(hyps, 1) == pytest.approx(60.0)  # {a, b, c} of 5 unigrams
    assert distinct(hyps, 2) == pytest.approx(100.0)  # ab, ba, ac
    assert unique_sentence_ratio([["a", "b"], ["a", "b"], ["c"]]) == pytest.approx(2 / 3)


def test_feature_metrics_by_hand():
    feature_set = {"room", "staff", "pool", "front desk", "bar"}
    hyps = [tokenize(t) for t in ["the room and staff", "nice pool", "the front desk was rude", "nothing",
                                  "room and pool"]]
    features = [["room"], ["staff"], ["front desk"], ["pool"], ["room"]]
    got = feature_metrics(hyps, features, feature_set)
    assert got["fmr"] == pytest.approx(3 / 5)
    assert got["fcr"] == pytest.approx(4 / 5)  # "bar" never mentioned
    # shared features: (1, 5) share room, (2, 5) share pool: 2 over 10 pairs
    assert got["div"] == pytest.approx(0.2)
    detected = [detect_features(h, feature_set) for h in hyps]
    brute = sum(len(a & b) for a, b in itertools.combinations(detected, 2)) / 10
    assert got["div"] == pytest.approx(brute)


def test_identical_predictions_score_100():
    refs = ["the room was great and i would come back", "honestly a noisy bar , not what we paid for",
            "loved the quiet pool , best part of the trip"]
    got = text_metrics(refs, list(refs), [["room"], ["bar"], ["pool"]])
    for key in ("bleu1", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100.0), key
    assert got["fmr"] == 1.0 and got["fcr"] == 1.0 and got["usr"] == 1.0


def test_text_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per record"):
        text_metrics(["a"], ["a", "b"], [["a"]])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT and a word-level tokenizer, saved to a local folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "room", "was", "great", "bad", "pool", "nice", ","]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                   ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    return path, tok


def test_bertscore_matches_a_loop_over_tokens(tiny_bert):
    import torch
    from transformers import BertModel

    path, tok = tiny_bert
    refs = ["the room was great", "the pool was bad", "nice room"]
    gens = ["the room was great", "nice pool , the room", "bad"]
    got = bertscore(refs, gens, str(path), batch_size=2)
    model = BertModel.from_pretrained(path).eval().double()
    ps, rs, fs = [], [], []
    for ref, gen in zip(refs, gens, strict=True):
        with torch.no_grad():
            e = [model(**tok(t, return_tensors="pt")).last_hidden_state[0, 1:-1] for t in (gen, ref)]
        h, r = (torch.nn.functional.normalize(x, dim=-1) for x in e)
        sim = h @ r.T
        p, rr = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
        ps.append(p), rs.append(rr), fs.append(2 * p * rr / (p + rr))
    assert got["bertscore_p"] == pytest.approx(sum(ps) / 3, abs=1e-5)
    assert got["bertscore_r"] == pytest.approx(sum(rs) / 3, abs=1e-5)
    assert got["bertscore_f"] == pytest.approx(sum(fs) / 3, abs=1e-5)
    same = bertscore(refs, refs, str(path))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in same.values())


def test_bertscore_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        bertscore(["a"], ["a"], str(tmp_path / "missing"))
