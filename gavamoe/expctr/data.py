"""Data of ExpCTR: (user, item, click) pairs with item titles and genres, a time-ordered split,
each user's history of liked and disliked items for the prompt, and cold users.

MovieLens-style folder: ``ratings.csv`` (header ``userId,movieId,rating,timestamp``; the
ml-latest names, or ``user,item,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``
with genres separated by ``|``). The label is ``rating >= 4``. The split is by time over all
ratings: the latest ``test_fraction`` of them are the test pairs (ties broken by file order).

History: each user's first ``history`` training pairs in time, shown in the prompt as liked
(label 1) and disliked (label 0) items. The prompt of a history pair leaves that pair out, so no
prompt contains its own label. A user is cold when they have at most ``cold_max`` training pairs.

Synthetic data (the default): planted genre tastes. Each user likes 2 of the 6 genres and
dislikes 2 others; each item has 2 genres (its title, "film i", is left out of prompts); a pair
is clicked with probability
``sigmoid(3 * (#liked genres of the item) - 3 * (#disliked) - 0.5 + user bias + item bias)``.
Every user has 10 history pairs; warm users have ``warm_pairs`` more training pairs; cold users
have none more, so their IDs carry little, while their prompt still shows their history. With
300 items an item is in about 31 training pairs, so item IDs carry little too, while every
prompt names the target's genres (the README measures 120 items beside it).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserInputError

GENRES = ("comedy", "drama", "horror", "action", "romance", "scifi")
LIKED_RATING = 4.0


@dataclass
class CtrData:
    """Pairs in time order with their split; item metadata; per-user history and coldness.

    users, items, labels, train: (P,) arrays; titles[i] and genres[i] per item index;
    history[u]: the user's history pairs (indices into the pair arrays), time order;
    liked_genres/disliked_genres[u]: the planted tastes (synthetic data only)."""

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    titles: list[str]
    genres: list[list[str]]
    history: list[list[int]]
    cold: np.ndarray  # (num_users,) bool
    source: str = "synthetic"
    titles_in_prompt: bool = True  # False on synthetic data, whose titles carry nothing
    user_names: list[str] | None = None  # the file's ids (default: the index)
    liked_genres: list[set[str]] | None = None
    disliked_genres: list[set[str]] | None = None

    def user_name(self, user: int) -> str:
        return self.user_names[user] if self.user_names is not None else str(user)

    @property
    def num_users(self) -> int:
        return len(self.history)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def pairs(self, split: str) -> np.ndarray:
        """Indices of the training or test pairs."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return np.flatnonzero(self.train if split == "train" else ~self.train)


def _histories(users: np.ndarray, train: np.ndarray, num_users: int, history: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(num_users)]
    for p in np.flatnonzero(train):  # pairs are in time order
        if len(out[users[p]]) < history:
            out[users[p]].append(int(p))
    return out


def _cold(users: np.ndarray, train: np.ndarray, num_users: int, cold_max: int) -> np.ndarray:
    return np.bincount(users[train], minlength=num_users) <= cold_max


def planted_genres(num_users: int = 300, num_items: int = 300, warm_pairs: int = 30, test_pairs: int = 6,
                   cold_fraction: float = 0.3, history: int = 10, seed: int = 0) -> CtrData:
    """Synthetic pairs with planted liked and disliked genres (see the module docstring)."""
    for flag, value in (("--synthetic-users", num_users), ("--synthetic-items", num_items),
                        ("--synthetic-test-pairs", test_pairs), ("--history", history)):
        if value < 1:
            raise UserInputError(f"{flag} must be at least 1, got {value}")
    if warm_pairs < 0:
        raise UserInputError(f"--synthetic-warm-pairs must be non-negative, got {warm_pairs}")
    if not 0 <= cold_fraction <= 1:
        raise UserInputError(f"--synthetic-cold-fraction must lie in [0, 1], got {cold_fraction}")
    if history + warm_pairs + test_pairs > num_items:
        raise UserInputError(f"a user rates {history + warm_pairs + test_pairs} distinct items, more than "
                             f"--synthetic-items={num_items}")
    rng = np.random.default_rng(seed)
    item_genres = [sorted(rng.choice(len(GENRES), size=2, replace=False).tolist()) for _ in range(num_items)]
    tastes = [rng.permutation(len(GENRES))[:4] for _ in range(num_users)]
    user_bias, item_bias = rng.normal(0, 0.5, num_users), rng.normal(0, 0.5, num_items)
    cold_users = set(rng.permutation(num_users)[:round(cold_fraction * num_users)].tolist())
    rows = []  # (time, user, item, label, train)
    for u in range(num_users):
        liked, disliked = set(tastes[u][:2].tolist()), set(tastes[u][2:].tolist())
        n_train = history + (0 if u in cold_users else warm_pairs)
        for t, i in enumerate(rng.choice(num_items, size=n_train + test_pairs, replace=False).tolist()):
            score = (3.0 * len(liked.intersection(item_genres[i])) - 3.0 * len(disliked.intersection(item_genres[i]))
                     - 0.5 + user_bias[u] + item_bias[i])
            label = int(rng.random() < 1 / (1 + np.exp(-score)))
            # training pairs first in time, the test pairs last (the time-ordered split)
            rows.append((t if t < n_train else 1000 + t, u, i, label, t < n_train))
    rows.sort(key=lambda r: (r[0], r[1]))
    users, items, labels, train = (np.array([r[k] for r in rows]) for k in range(1, 5))
    train = train.astype(bool)
    return CtrData(users=users, items=items, labels=labels, train=train, titles=[f"film {i}" for i in range(num_items)],
                   genres=[[GENRES[g] for g in gs] for gs in item_genres],
                   history=_histories(users, train, num_users, history),
                   cold=np.array([u in cold_users for u in range(num_users)]), titles_in_prompt=False,
                   liked_genres=[{GENRES[g] for g in t[:2]} for t in tastes],
                   disliked_genres=[{GENRES[g] for g in t[2:]} for t in tastes])


def _columns(path: Path, header: list[str], wanted: dict[str, tuple[str, ...]]) -> dict[str, int]:
    names = [h.strip() for h in header]
    out = {}
    for key, options in wanted.items():
        found = [n for n in options if n in names]
        if not found:
            raise UserInputError(f"{path}: the header has no {' or '.join(options)} column (got {','.join(header)})")
        out[key] = names.index(found[0])
    return out


def read_movielens(folder: str | Path, test_fraction: float = 0.2, history: int = 10, cold_max: int = 15) -> CtrData:
    """A MovieLens-style folder (see the module docstring); errors name the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"--data {folder}: no such folder (give 'synthetic' or a folder with ratings.csv and "
                             "movies.csv)")
    if not 0 < test_fraction < 1:
        raise UserInputError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
    if history < 1:
        raise UserInputError(f"--history must be at least 1, got {history}")
    if cold_max < 0:
        raise UserInputError(f"--cold-max must be non-negative, got {cold_max}")
    for name in ("ratings.csv", "movies.csv"):
        if not (folder / name).is_file():
            raise UserInputError(f"--data {folder}: no {name} in the folder")
    movies: dict[str, tuple[str, list[str]]] = {}
    path = folder / "movies.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        cols = _columns(path, next(reader, []), {"item": ("movieId", "item"), "title": ("title",),
                                                 "genres": ("genres",)})
        for line, row in enumerate(reader, start=2):
            if len(row) < len(cols):
                raise UserInputError(f"{path}:{line}: {len(row)} fields, expected at least {len(cols)}")
            genres = [g.strip().lower() for g in row[cols["genres"]].split("|") if g.strip()]
            movies[row[cols["item"]]] = (row[cols["title"]].strip(), [g for g in genres if g != "(no genres listed)"])
    events = []
    path = folder / "ratings.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        cols = _columns(path, next(reader, []), {"user": ("userId", "user"), "item": ("movieId", "item"),
                                                 "rating": ("rating",), "time": ("timestamp", "time")})
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                rating, when = float(row[cols["rating"]]), float(row[cols["time"]])
            except (ValueError, IndexError):
                raise UserInputError(f"{path}:{line}: rating and timestamp must be numbers, got {row}") from None
            if not (math.isfinite(rating) and math.isfinite(when)):  # NaN: no label, no place in time
                raise UserInputError(f"{path}:{line}: rating and timestamp must be finite numbers, got {row}")
            if row[cols["item"]] not in movies:
                raise UserInputError(f"{path}:{line}: item {row[cols['item']]} is not in movies.csv")
            events.append((when, line, row[cols["user"]], row[cols["item"]], rating))
    if len(events) < 2:
        raise UserInputError(f"{path}: fewer than 2 ratings")
    events.sort(key=lambda e: (e[0], e[1]))
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    users = np.array([user_ids.setdefault(e[2], len(user_ids)) for e in events])
    items = np.array([item_ids.setdefault(e[3], len(item_ids)) for e in events])
    labels = np.array([int(e[4] >= LIKED_RATING) for e in events])
    train = np.arange(len(events)) < len(events) - max(1, round(test_fraction * len(events)))
    meta = [movies[name] for name in item_ids]
    return CtrData(users=users, items=items, labels=labels, train=train, titles=[m[0] for m in meta],
                   genres=[m[1] for m in meta], history=_histories(users, train, len(user_ids), history),
                   cold=_cold(users, train, len(user_ids), cold_max), source=str(folder.resolve()),
                   user_names=list(user_ids))
