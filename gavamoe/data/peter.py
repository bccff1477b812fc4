"""The PETER/PEPLER review format (TripAdvisor, Amazon Movies & TV, Yelp).

``reviews.pickle``: a list of dicts with ``user``, ``item``, ``rating`` and ``template`` =
(feature, adjective, sentence, sentiment). An index directory holds ``train.index``,
``validation.index`` and ``test.index``, each one line of space-separated record positions.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "validation", "test")


class RefusedPickleError(pickle.UnpicklingError):
    """The pickle asked to build an object other than builtin containers and scalars."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes make (list, dict, tuple, set, str, bytes, int,
    float, bool, None); any class or function lookup is refused, so loading runs no code."""

    def find_class(self, module, name):
        raise RefusedPickleError(
            f"refused to load {module}.{name}: a reviews pickle may hold only lists, dicts, tuples, strings and "
            f"numbers, and loading any other object could run code. Convert the file to plain Python types first."
        )


def restricted_load(data: bytes):
    """pickle.loads that admits only builtin containers and scalars (see _RestrictedUnpickler)."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


@dataclass
class ReviewData:
    """Records with integer ids, splits and vocabularies.

    records: the dicts as loaded (``user``/``item`` keep their original ids, plus ``user_idx``,
    ``item_idx``); splits: split name -> record positions; users/items: index -> original id;
    features: the feature vocabulary of the training split; user_train_freq[u]: training
    records of user u (for the sparsity breakdown)."""

    records: list[dict]
    splits: dict[str, np.ndarray]
    users: list[str]
    items: list[str]
    features: list[str]
    user_train_freq: np.ndarray
    has_groups: bool = field(default=False)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def split(self, name: str) -> list[dict]:
        return [self.records[i] for i in self.splits[name]]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """user (n,) int64, item (n,) int64, rating (n,) fp32, and group (n,) int64 when planted."""
        rows = self.split(name)
        out = {
            "user": torch.tensor([r["user_idx"] for r in rows], dtype=torch.long),
            "item": torch.tensor([r["item_idx"] for r in rows], dtype=torch.long),
            "rating": torch.tensor([float(r["rating"]) for r in rows], dtype=torch.float32),
        }
        if self.has_groups:
            out["group"] = torch.tensor([r["group"] for r in rows], dtype=torch.long)
        return out


def _check_record(i: int, record) -> None:
    if not isinstance(record, dict) or not {"user", "item", "rating", "template"} <= record.keys():
        raise ValueError(f"record {i} must be a dict with keys user, item, rating, template; got {record!r:.200}")
    template = record["template"]
    if not isinstance(template, (tuple, list)) or len(template) != 4:
        raise ValueError(f"record {i}: template must be (feature, adjective, sentence, sentiment), "
                         f"got {template!r:.200}")


def _read_index(path: Path, n: int) -> np.ndarray:
    text = path.read_text().split()
    positions = np.array([int(t) for t in text], dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"{path} holds positions outside [0, {n})")
    return positions


def build(records: list[dict], splits: dict[str, np.ndarray]) -> ReviewData:
    """Index users, items and features; count training records per user."""
    for i, record in enumerate(records):
        _check_record(i, record)
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    for record in records:
        record["user_idx"] = user_index.setdefault(str(record["user"]), len(user_index))
        record["item_idx"] = item_index.setdefault(str(record["item"]), len(item_index))
    features = sorted({str(records[i]["template"][0]) for i in splits["train"]})
    freq = np.bincount([records[i]["user_idx"] for i in splits["train"]], minlength=len(user_index))
    return ReviewData(records, splits, list(user_index), list(item_index), features, freq,
                      has_groups=all("group" in r for r in records))


def random_splits(n: int, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Seeded 8:1:1 split of record positions."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def load_peter(reviews_path, index_dir=None, seed: int = 0) -> ReviewData:
    """Load a PETER/PEPLER ``reviews.pickle`` (restricted unpickler: plain Python types only).

    With ``index_dir``, splits come from its train/validation/test.index files; without, from
    a seeded 8:1:1 split."""
    records = restricted_load(Path(reviews_path).read_bytes())
    if not isinstance(records, list):
        raise ValueError(f"{reviews_path} must hold a list of review dicts, got {type(records).__name__}")
    if index_dir is None:
        splits = random_splits(len(records), seed)
    else:
        missing = [s for s in SPLITS if not (Path(index_dir) / f"{s}.index").exists()]
        if missing:
            raise ValueError(f"{index_dir} lacks {', '.join(s + '.index' for s in missing)}")
        splits = {s: _read_index(Path(index_dir) / f"{s}.index", len(records)) for s in SPLITS}
    return build(records, splits)
