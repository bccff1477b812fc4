"""A seeded synthetic review set in the PETER record format, with planted taste groups.

Users belong to taste groups; each group has its own rating style (generous, harsh,
moderate, polarised, ...) and weighs item features differently, so the same item gets
different ratings from different groups. Explanations are written from templates that
name the item's feature and the sentiment, in a wording of the user's group, so that a
cluster-aware explainer can do better than a shared one. Records carry ``group``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserInputError
from .peter import ReviewData, build, random_splits

FEATURES = ["room", "staff", "location", "breakfast", "price", "pool", "view", "bed", "wifi", "bathroom",
            "service", "food", "parking", "noise", "decor", "music", "bar", "gym", "spa", "lobby"]
POSITIVE = ["great", "lovely", "spotless", "friendly", "quiet", "perfect", "comfortable", "excellent"]
NEGATIVE = ["awful", "dirty", "rude", "noisy", "tiny", "broken", "overpriced", "poor"]
# one wording per group: (positive sentence, negative sentence)
STYLES = [
    ("the {feature} was {adjective} and i would come back for it",
     "the {feature} was {adjective} and spoiled the stay"),
    ("honestly a {adjective} {feature} , exactly what we wanted",
     "honestly a {adjective} {feature} , not what we paid for"),
    ("loved the {adjective} {feature} , best part of the trip",
     "hated the {adjective} {feature} , worst part of the trip"),
    ("for business travel the {feature} is {adjective} and efficient",
     "for business travel the {feature} is {adjective} and a problem"),
    ("our kids thought the {feature} was {adjective}",
     "our kids thought the {feature} was {adjective} , sadly"),
    ("the {adjective} {feature} made it worth the money",
     "the {adjective} {feature} made it not worth the money"),
]


# rating style per group: (centre, spread) of rating = centre + spread * tanh(taste . features)
RATING_STYLES = [(4.3, 0.9), (1.7, 0.9), (3.0, 0.6), (3.0, 2.2), (3.8, 1.6), (2.2, 1.6)]


def make_synthetic(num_users: int = 2000, num_items: int = 1500, num_records: int = 40000, num_groups: int = 4,
                   noise: float = 0.35, seed: int = 0) -> ReviewData:
    """Generate records {user, item, rating, template, group}, split 8:1:1 (seeded).

    rating = clip(round(centre[g] + spread[g] * tanh(taste[g] . item_features + item_bias) + noise), 1, 5)
    for the user's group g: groups differ in rating style and in which features they like."""
    if num_groups > len(STYLES):
        raise UserInputError(f"--synthetic-groups must be at most {len(STYLES)}, got {num_groups}")
    if min(num_users, num_items, num_records, num_groups) < 1:
        raise UserInputError("--synthetic-users, -items, -records and -groups must be positive")
    rng = np.random.default_rng(seed)
    n_feat = len(FEATURES)
    user_group = rng.integers(0, num_groups, num_users)
    taste = rng.normal(0, 1.5, (num_groups, n_feat))  # [G, F] how much each group likes each feature
    item_feats = np.zeros((num_items, n_feat))
    item_main = rng.integers(0, n_feat, (num_items, 2))  # each item has two salient features
    item_feats[np.arange(num_items)[:, None], item_main] = 1.0
    item_bias = rng.normal(0, 0.3, num_items)
    users = rng.integers(0, num_users, num_records)
    items = rng.integers(0, num_items, num_records)
    groups = user_group[users]
    score = (taste[groups] * item_feats[items]).sum(-1) / np.sqrt(2) + item_bias[items]
    centre, spread = np.array(RATING_STYLES[:num_groups]).T[:, groups]
    noisy = centre + spread * np.tanh(score) + rng.normal(0, noise, num_records)
    ratings = np.clip(np.rint(noisy), 1, 5).astype(int)
    records = []
    for n in range(num_records):
        g = int(groups[n])
        # the feature an explanation names: the item feature its group cares about most
        feats = item_main[items[n]]
        feature = FEATURES[feats[np.argmax(np.abs(taste[g, feats]))]]
        positive = ratings[n] >= 3
        adjective = str(rng.choice(POSITIVE if positive else NEGATIVE))
        sentence = STYLES[g][0 if positive else 1].format(feature=feature, adjective=adjective)
        records.append({"user": f"u{users[n]}", "item": f"i{items[n]}", "rating": float(ratings[n]),
                        "template": (feature, adjective, sentence, 1 if positive else -1), "group": g})
    return build(records, random_splits(num_records, seed), "the synthetic data")


PLANTED_KINDS = ("taste", "level")


def planted_reviews(num_users: int = 600, num_items: int = 500, num_records: int = 12000, num_groups: int = 4,
                    kind: str = "taste", seed: int = 1) -> list[dict]:
    """PETER-format records (with ``group``) from a generator independent of make_synthetic, for
    checking that stage 1 recovers user groups on data it was not tuned on. Items fall in 10
    categories; a group's rating of an item is 3.2 + level[g] + taste[g, category] + item
    quality + N(0, 0.5), rounded and clipped to 1..5. "taste": groups differ only in taste
    (N(0, 1.2) per category); "level": also in level (-1 to 1) with milder taste (N(0, 0.8))."""
    if kind not in PLANTED_KINDS:
        raise UserInputError(f"kind must be one of {PLANTED_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, num_groups, num_users)
    categories = 10
    item_category = rng.integers(0, categories, num_items)
    quality = rng.normal(0, 0.5, num_items)
    taste = rng.normal(0, 1.2 if kind == "taste" else 0.8, (num_groups, categories))
    level = np.zeros(num_groups) if kind == "taste" else np.linspace(-1, 1, num_groups)
    users = rng.integers(0, num_users, num_records)
    items = rng.integers(0, num_items, num_records)
    groups = user_group[users]
    noisy = 3.2 + level[groups] + taste[groups, item_category[items]] + quality[items] + rng.normal(0, 0.5, num_records)
    ratings = np.clip(np.rint(noisy), 1, 5)
    records = []
    for n in range(num_records):
        feature = f"aspect{item_category[items[n]]}"
        positive = ratings[n] >= 3
        adjective = "good" if positive else "bad"
        records.append({"user": f"U{users[n]}", "item": f"I{items[n]}", "rating": float(ratings[n]),
                        "template": (feature, adjective, f"the {feature} is {adjective}", 1 if positive else -1),
                        "group": int(groups[n])})
    return records
