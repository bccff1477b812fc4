"""Data of FAME: item sequences from RecBole atomic ``.inter`` files or a synthetic generator with
planted facets, split leave-one-out.

A ``.inter`` file is tab-separated with a typed header, ``user_id:token  item_id:token
timestamp:float ...``; other columns are ignored. Each user's items are ordered by timestamp
(stable: the file's order breaks ties; without a timestamp column the file's order is the time).
Users with fewer than 3 interactions are dropped (they have no training item once the last two
are held out). Items are renumbered 1..num_items in order of first appearance; 0 is padding.

Leave-one-out (SASRec, FAME): the last item of each user is the test target, the second last
the validation target, the rest the training sequence; every model input is the most recent
``max_len`` items before its target.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError

MIN_INTERACTIONS = 3


@dataclass
class Sequences:
    """Time-ordered item ids (1..num_items) per user; for synthetic data the planted facets."""

    num_items: int
    users: list[str]
    items: list[list[int]]
    item_facets: np.ndarray | None = None  # (num_items + 1, F) facet values; row 0 is padding
    user_facet: np.ndarray | None = None  # (users,) the facet each user's choices follow
    user_liked: np.ndarray | None = None  # (users, 2) the two values of that facet the user likes
    source: str = "synthetic"
    synthetic: dict | None = None  # planted_facets' parameters (the oracle's stick), for the run's config
    dropped_users: int = 0
    item_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.users)


def read_inter(path: str | Path) -> Sequences:
    """A RecBole atomic .inter file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--data {path}: no such file (give 'synthetic' or a RecBole .inter file)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None:
            raise UserInputError(f"{path}: empty file")
        names = [h.split(":")[0].strip() for h in header]
        for column in ("user_id", "item_id"):
            if column not in names:
                raise UserInputError(f"{path}: the header has no {column} column (got {' '.join(header)})")
        u, i = names.index("user_id"), names.index("item_id")
        t = names.index("timestamp") if "timestamp" in names else None
        events: dict[str, list[tuple[float, int, str]]] = {}
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < len(names):
                raise UserInputError(f"{path}:{line}: {len(row)} fields, the header has {len(names)}")
            try:
                when = float(row[t]) if t is not None else float(line)
            except ValueError:
                raise UserInputError(f"{path}:{line}: timestamp {row[t]!r} is not a number") from None
            if not math.isfinite(when):  # a NaN would sort its user's sequence arbitrarily
                raise UserInputError(f"{path}:{line}: timestamp {row[t]!r} is not a finite number")
            events.setdefault(row[u], []).append((when, line, row[i]))
    ids: dict[str, int] = {}
    users, items, dropped = [], [], 0
    for user, seq in events.items():
        if len(seq) < MIN_INTERACTIONS:
            dropped += 1
            continue
        seq.sort(key=lambda e: (e[0], e[1]))
        users.append(user)
        items.append([ids.setdefault(name, len(ids) + 1) for _, _, name in seq])
    if not users:
        raise UserInputError(f"{path}: no user has {MIN_INTERACTIONS} or more interactions")
    return Sequences(len(ids), users, items, source=str(path.resolve()), dropped_users=dropped,
                     item_names=list(ids))


def planted_facets(num_users: int = 1000, num_items: int = 100, num_facets: int = 2, values: int = 4,
                   length: int = 20, stick: float = 0.8, noise: float = 0.1, seed: int = 0) -> Sequences:
    """Synthetic sequences with planted facets.

    Every item has a value in each of ``num_facets`` facets (uniform, independent). Every user
    follows one facet f_u and likes two of its values: each next item is, with probability
    1 - ``noise``, drawn uniformly from the items whose facet-f_u value is the previous item's
    (with probability ``stick``) or the user's other liked value; otherwise from all items.
    So the next item is predictable only along the user's facet, which the model has to find
    from the history; the other facets are noise."""
    for name, value in (("users", num_users), ("items", num_items), ("facets", num_facets)):
        if value < 1:
            raise UserInputError(f"--synthetic-{name} must be at least 1, got {value}")
    if values < 2:
        raise UserInputError(f"--synthetic-values must be at least 2 (each user likes two values of its facet), "
                             f"got {values}")
    if length < MIN_INTERACTIONS:
        raise UserInputError(f"--synthetic-length must be at least {MIN_INTERACTIONS}, got {length}")
    rng = np.random.default_rng(seed)
    facets = rng.integers(0, values, (num_items, num_facets))
    by_value = [[np.flatnonzero(facets[:, f] == v) for v in range(values)] for f in range(num_facets)]
    user_facet = rng.integers(0, num_facets, num_users)
    sequences, user_liked = [], []
    for f in user_facet:
        liked = rng.choice(values, 2, replace=False)
        user_liked.append(liked)
        current = liked[0]
        seq = []
        for _ in range(length):
            if rng.random() < noise or not len(by_value[f][current]):
                item = rng.integers(num_items)
            else:
                item = rng.choice(by_value[f][current])
            seq.append(int(item) + 1)
            if rng.random() >= stick:
                current = liked[1] if current == liked[0] else liked[0]
        sequences.append(seq)
    padded = np.vstack([np.full((1, num_facets), -1), facets])
    parameters = dict(num_users=num_users, num_items=num_items, num_facets=num_facets, values=values, length=length,
                      stick=stick, noise=noise, seed=seed)
    return Sequences(num_items, [str(u) for u in range(num_users)], sequences, padded, user_facet,
                     np.array(user_liked).reshape(num_users, 2), synthetic=parameters)


@dataclass
class Split:
    """Model inputs of one split: right-aligned item ids (n, max_len), 0 = padding, and targets:
    (n, max_len) for training (the next item at every position, 0 where none), (n,) otherwise."""

    inputs: torch.Tensor
    targets: torch.Tensor
    users: torch.Tensor  # (n,) index into Sequences.users


def _right_aligned(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = seq[-max_len:]
        if seq:
            out[row, max_len - len(seq):] = torch.tensor(seq)
    return out


def leave_one_out(data: Sequences, max_len: int = 50) -> dict[str, Split]:
    """train: inputs s[:-3], targets s[1:-2] position by position (the training sequence s[:-2]
    shifted by one); validation: s[:-2] -> s[-2]; test: s[:-1] -> s[-1]; each cut to its most
    recent max_len items."""
    if max_len < 1:
        raise UserInputError(f"--max-len must be at least 1, got {max_len}")
    users = torch.arange(len(data))
    train = [s[:-2] for s in data.items]
    return {
        "train": Split(_right_aligned([s[:-1] for s in train], max_len),
                       _right_aligned([s[1:] for s in train], max_len), users),
        "validation": Split(_right_aligned([s[:-2] for s in data.items], max_len),
                            torch.tensor([s[-2] for s in data.items]), users),
        "test": Split(_right_aligned([s[:-1] for s in data.items], max_len),
                      torch.tensor([s[-1] for s in data.items]), users),
    }


def planted_oracle_scores(data: Sequences, split: Split, generator: torch.Generator) -> torch.Tensor:
    """Scores (n, num_items) of the ranker that knows the planted truth of ``planted_facets``: each
    user's facet and two liked values. The liked value of the latest input item that has one is
    the current one; items with the value the next item likelier has (the current one when
    ``stick`` >= 1/2) score 2, items with the other liked value 1, the rest 0 (both liked values
    1.5 when no input item has one), plus uniform noise in [0, 1/2) so that ties, which no model
    can break on this data, fall at random."""
    if data.user_liked is None or data.item_facets is None or data.user_facet is None or data.synthetic is None:
        raise ValueError("the oracle needs planted data (planted_facets)")
    inputs, users = split.inputs.numpy(), split.users.numpy()
    facet, liked = data.user_facet[users], data.user_liked[users]  # (n,), (n, 2)
    seen = data.item_facets[inputs, facet[:, None]]  # (n, L); padding is -1
    is_liked = (seen[..., None] == liked[:, None, :]).any(-1)
    found = is_liked.any(1)
    last = seen.shape[1] - 1 - is_liked[:, ::-1].argmax(1)
    current = seen[np.arange(len(seen)), last]
    other = np.where(current == liked[:, 0], liked[:, 1], liked[:, 0])
    first, second = (current, other) if data.synthetic["stick"] >= 0.5 else (other, current)
    values = data.item_facets[1:][:, facet].T  # (n, num_items): each item's value in the user's facet
    scores = np.where(values == first[:, None], 2.0, np.where(values == second[:, None], 1.0, 0.0))
    either = (values == liked[:, :1]) | (values == liked[:, 1:])
    scores = np.where(found[:, None], scores, np.where(either, 1.5, 0.0))
    noise = torch.rand(scores.shape, generator=generator, dtype=torch.float64) / 2
    return torch.as_tensor(scores) + noise
