"""Stage 2 text: the explanation prompt, the embedded tokenizer, and padded batches.

The prompt follows the paper's Fig. 2: the released code's system sentence, then "The user has a
{positive / negative} experience with the item, the item has {features} features, please provide
an explanation for recommending <item> to <user>." The two placeholder tokens ``<user>`` and
``<item>`` are where the explainer splices in the projected stage-1 embeddings. The feature comes
from the record's template (PEPLER's feature-prompt setting); the sentiment from the rating, the
paper's input (positive when rating >= 3, as the released code), or with ``sentiment="template"``
from the template's sentiment.

Special tokens come only from the prompt template. A record's own text (its feature and its
explanation) is encoded as plain text: a review that contains ``</s>`` or ``<user>`` gets the
tokens of those characters, never the control tokens, so it cannot end an explanation early or
choose where the embeddings are spliced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the released GaVaMoE code's system sentence, verbatim
SYSTEM_PROMPT = ("You are a professional explainer, Your assignment involves providing users with a detailed "
                 "explanation regarding a specific item.")
SENTIMENTS = ("rating", "template")  # where the prompt's positive / negative comes from
INSTRUCTION = ("The user has a {sentiment} experience with the item, the item has {features} features, "
               "please provide an explanation for recommending {item} to {user}.")
USER_TOKEN, ITEM_TOKEN = "<user>", "<item>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER_TOKEN, ITEM_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # train_tokenizer's byte alphabet and special tokens
IGNORE = -100  # label of prompt and padding positions: no loss there


def feature(record: dict) -> str:
    return str(record["template"][0])


def explanation(record: dict) -> str:
    return str(record["template"][2])


def positive(record: dict, sentiment: str = "rating") -> bool:
    """"rating": rating >= 3 (the released code's rule); "template": the template's sentiment
    (+1 / -1 in PETER data), the rating where it is missing."""
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
    mark = record["template"][3]
    if sentiment == "template" and mark is not None:
        return float(mark) > 0
    return float(record["rating"]) >= 3


FEATURE_SLOT = "\x00feature\x00"  # where the record's feature goes in a rendered prompt


def _render(features: str, is_positive: bool, tokenizer) -> str:
    instruction = INSTRUCTION.format(sentiment="positive" if is_positive else "negative", features=features,
                                     item=ITEM_TOKEN, user=USER_TOKEN)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT} {instruction}"


def prompt_text(record: dict, tokenizer, sentiment: str = "rating") -> str:
    """The prompt of one record, through the tokenizer's chat template when it has one (as text:
    what the tokenizer is trained on and what a reader sees; encode() tokenises it safely)."""
    return _render(feature(record), positive(record, sentiment), tokenizer)


def _plain_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of user text with every special-token string taken as plain characters."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []


def prompt_ids(records: list[dict], tokenizer, sentiment: str = "rating") -> list[list[int]]:
    """Prompt token ids: the template's pieces with their special tokens, the feature as plain text."""
    pieces = {}
    for is_positive in (True, False):
        before, after = _render(FEATURE_SLOT, is_positive, tokenizer).split(FEATURE_SLOT)
        ids = tokenizer([before, after], add_special_tokens=False)["input_ids"]
        pieces[is_positive] = ids
    features = _plain_ids(tokenizer, [feature(r) for r in records])
    out = []
    for record, feature_ids in zip(records, features, strict=True):
        before, after = pieces[positive(record, sentiment)]
        out.append([*before, *feature_ids, *after])
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 4000):
    """A byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library, wrapped
    as a transformers PreTrainedTokenizerFast; knows <s> </s> <pad> <unk> <user> <item>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=[USER_TOKEN, ITEM_TOKEN])


def prepare_tokenizer(tokenizer):
    """Give a pretrained tokenizer the placeholder tokens and a pad token (GPT-2 has none).
    Returns True when the vocabulary grew (the model's embeddings must be resized)."""
    before = len(tokenizer)
    missing = [t for t in (USER_TOKEN, ITEM_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(tokenizer) != before


@dataclass
class EncodedSplit:
    """One split, tokenised once: prompt and explanation token ids per record, plus the
    record's user/item indices, rating and, when stage 2 routes by a fixed table, cluster."""

    prompts: list[list[int]]
    targets: list[list[int]]
    users: torch.Tensor  # (n,) int64
    items: torch.Tensor  # (n,) int64
    ratings: torch.Tensor  # (n,) fp32
    clusters: torch.Tensor | None = None  # (n,) int64

    def __len__(self) -> int:
        return len(self.prompts)


def encode(records: list[dict], tokenizer, max_explanation_tokens: int = 32, sentiment: str = "rating",
           clusters: torch.Tensor | None = None) -> EncodedSplit:
    """Tokenise prompts (BOS first when the tokenizer has one and no chat template added it) and
    explanations (plain text, cut to ``max_explanation_tokens``, then EOS)."""
    if clusters is not None and len(clusters) != len(records):
        raise ValueError(f"{len(clusters)} clusters for {len(records)} records")
    prompts = prompt_ids(records, tokenizer, sentiment)
    bos = tokenizer.bos_token_id
    if bos is not None:
        prompts = [ids if ids[:1] == [bos] else [bos, *ids] for ids in prompts]
    target_ids = _plain_ids(tokenizer, [" " + explanation(r).strip() for r in records])
    targets = [[*ids[:max_explanation_tokens], tokenizer.eos_token_id] for ids in target_ids]
    return EncodedSplit(prompts, targets,
                        torch.tensor([r["user_idx"] for r in records], dtype=torch.long),
                        torch.tensor([r["item_idx"] for r in records], dtype=torch.long),
                        torch.tensor([float(r["rating"]) for r in records], dtype=torch.float32), clusters)


def training_batch(split: EncodedSplit, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + explanation, right-padded. labels hold the explanation tokens only (IGNORE
    elsewhere), so the loss is the NLL of the explanation."""
    seqs = [split.prompts[i] + split.targets[i] for i in rows]
    width = max(map(len, seqs))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, i in enumerate(rows):
        n_prompt, n = len(split.prompts[i]), len(seqs[b])
        input_ids[b, :n] = torch.tensor(seqs[b])
        labels[b, n_prompt:n] = torch.tensor(split.targets[i])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "users": split.users[rows], "items": split.items[rows], "ratings": split.ratings[rows],
            **_clusters(split, rows)}


def _clusters(split: EncodedSplit, rows: list[int]) -> dict[str, torch.Tensor]:
    return {} if split.clusters is None else {"clusters": split.clusters[rows]}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), each (B, longest) int64, padded on the left
    (as generation wants: every sequence ends at the last column)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, s in enumerate(sequences):
        input_ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, width - len(s):] = 1
    return input_ids, attention_mask


def prompt_batch(split: EncodedSplit, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts only, left-padded for generation."""
    input_ids, attention_mask = left_pad([split.prompts[i] for i in rows], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "users": split.users[rows], "items": split.items[rows], **_clusters(split, rows)}
