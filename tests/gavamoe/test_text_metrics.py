"""Explanation metrics on cases worked out by hand, and identical predictions scoring 100."""

from __future__ import annotations

import itertools
import math

import pytest

from gavamoe.metrics import (
    bertscore,
    bertscore_pairs,
    bleu,
    detect_features,
    distinct,
    distinct_per_sentence,
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


def test_smoothed_bleu_adds_one_to_every_precision():
    ref = [["the", "cat", "sat", "on", "the", "mat"]]
    short = [["the", "cat", "on", "the", "mat"]]
    # matches / possible: 5/5, 3/4, 1/3, 0/2 -> (m + 1) / (p + 1): 6/6, 4/5, 2/4, 1/3; brevity exp(1 - 6/5)
    want = 100 * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** 0.25 * math.exp(-0.2)
    assert bleu(ref, short, 4, smooth=True) == pytest.approx(want)
    assert bleu(ref, short, 4) == 0.0  # unsmoothed: no 4-gram match
    assert bleu([[]], [[]], 4, smooth=True) == 0.0  # nothing generated scores 0, not 100


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


def test_rouge_reports_precision_and_recall_beside_f():
    got = rouge([["a", "b", "c"]], [["a", "b", "a"]])
    assert got["rouge1_p"] == pytest.approx(100.0) and got["rouge1_r"] == pytest.approx(100 * 2 / 3)
    assert got["rouge2_p"] == pytest.approx(50.0) and got["rouge2_r"] == pytest.approx(50.0)
    got = rouge([["a", "x", "b", "y"]], [["a", "b"]])  # LCS 2: P = 2/2, R = 2/4
    assert got["rougeL_p"] == pytest.approx(100.0) and got["rougeL_r"] == pytest.approx(50.0)


def test_distinct_and_usr_by_hand():
    hyps = [["a", "b", "a"], ["a", "c"]]
    assert distinct(hyps, 1) == pytest.approx(60.0)  # {a, b, c} of 5 unigrams
    assert distinct(hyps, 2) == pytest.approx(100.0)  # ab, ba, ac
    assert unique_sentence_ratio([["a", "b"], ["a", "b"], ["c"]]) == pytest.approx(2 / 3)
    # per sentence: {a, b} of 3 tokens and {a, c} of 2, averaged; an empty text counts 0
    assert distinct_per_sentence(hyps, 1) == pytest.approx(100 * (2 / 3 + 2 / 2) / 2)
    assert distinct_per_sentence([*hyps, []], 2) == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)


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
    # PETER's lookup: single tokens only, so "front desk" is never found
    peter = feature_metrics(hyps, features, feature_set, match="peter")
    assert peter["fmr"] == pytest.approx(2 / 5) and peter["fcr"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="match must be one of"):
        feature_metrics(hyps, features, feature_set, match="fuzzy")


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
                                  sep_token="[SEP]", model_max_length=64)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    return path, tok


REFS = ["the room was great", "the pool was bad", "nice room"]
GENS = ["the room was great", "nice pool , the room", "bad"]


def _loop_bertscore(path, tok, layer, weight=lambda token: 1.0):
    """BERTScore by a loop over tokens in float64: layer ``layer``'s states, [CLS]/[SEP] dropped
    unless weighted (idf), greedy matching, weighted means."""
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(path).eval().double()
    out = []
    for ref, gen in zip(REFS, GENS, strict=True):
        states, weights = [], []
        for text in (gen, ref):
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
            states.append(torch.nn.functional.normalize(h, dim=-1))
            weights.append(torch.tensor([weight(t) for t in ids[0].tolist()], dtype=torch.float64))
        sim = states[0] @ states[1].T
        p = (sim.max(1).values * weights[0]).sum() / weights[0].sum()
        r = (sim.max(0).values * weights[1]).sum() / weights[1].sum()
        out.append((p.item(), r.item(), (2 * p * r / (p + r)).item()))
    return out


@pytest.mark.parametrize("layer", [1, 2])
def test_bertscore_matches_a_loop_over_tokens(tiny_bert, layer):
    path, tok = tiny_bert
    special = {tok.cls_token_id, tok.sep_token_id}
    got = bertscore_pairs(REFS, GENS, str(path), layer=layer, batch_size=2)
    want = _loop_bertscore(path, tok, layer, lambda t: 0.0 if t in special else 1.0)
    for i, (p, r, f) in enumerate(want):
        assert got["bertscore_p"][i] == pytest.approx(p, abs=1e-5)
        assert got["bertscore_r"][i] == pytest.approx(r, abs=1e-5)
        assert got["bertscore_f"][i] == pytest.approx(f, abs=1e-5)
    same = bertscore(REFS, REFS, str(path))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in same.values())


def test_bertscore_idf_weights_by_hand(tiny_bert):
    path, tok = tiny_bert
    # idf = log((M + 1) / (df + 1)) over the M = 3 references; [CLS] and [SEP] are in all: weight 0
    df = {}
    for ref in REFS:
        for t in set(tok(ref)["input_ids"]):
            df[t] = df.get(t, 0) + 1
    got = bertscore_pairs(REFS, GENS, str(path), idf=True)
    want = _loop_bertscore(path, tok, 2, lambda t: math.log(4 / (df.get(t, 0) + 1)))
    assert got["bertscore_f"] == pytest.approx([f for _, _, f in want], abs=1e-5)


def test_bertscore_of_an_empty_text_is_zero_and_rescaling_uses_the_baseline(tiny_bert, tmp_path):
    path, _ = tiny_bert
    raw = bertscore_pairs(["the room", "", "nice pool"], ["", "the room", "nice pool"], str(path))
    assert raw["bertscore_f"][:2].tolist() == [0.0, 0.0] and raw["bertscore_f"][2] == pytest.approx(1.0, abs=1e-5)
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.2,0.3,0.4\n2,0.5,0.6,0.7\n")
    scaled = bertscore_pairs(["the room", "", "nice pool"], ["", "the room", "nice pool"], str(path), layer=1,
                             rescale=True, baseline=str(baseline))
    layer1 = bertscore_pairs(["the room", "", "nice pool"], ["", "the room", "nice pool"], str(path), layer=1)
    for key, b in (("bertscore_p", 0.2), ("bertscore_r", 0.3), ("bertscore_f", 0.4)):
        assert scaled[key] == pytest.approx((layer1[key] - b) / (1 - b))
    with pytest.raises(ValueError, match="no BERTScore baseline"):
        bertscore_pairs(["a"], ["a"], str(path), rescale=True)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        bertscore_pairs(["a"], ["a"], str(path), layer=3)


def test_bertscore_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        bertscore(["a"], ["a"], str(tmp_path / "missing"))
