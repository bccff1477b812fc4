"""The PETER/PEPLER review format (TripAdvisor, Amazon Movies & TV, Yelp).

``reviews.pickle``: a list of dicts with ``user``, ``item``, ``rating`` and ``template`` =
(feature, adjective, sentence, sentiment). An index directory holds ``train.index``,
``validation.index`` and ``test.index``, each one line of space-separated record positions.
"""

from __future__ import annotations

import io
import math
import numbers
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError

SPLITS = ("train", "validation", "test")
MAX_PICKLE_BYTES = 4 * 2**30  # the largest PETER file (Yelp) is well under this
# objects a reviews pickle may expand to through shared references, per byte of the file (a
# plain pickle builds at most one object per opcode byte, so honest files stay far below)
MAX_OBJECTS_PER_BYTE = 2
MIN_OBJECT_BUDGET = 1_000_000
MAX_DEPTH = 4  # list of records > record dict > template tuple > field


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
    """pickle.loads that admits only builtin containers and scalars (see _RestrictedUnpickler),
    then walks what it built with a budget: a pickle that expands through shared references
    ("billion laughs": a few hundred bytes that reach 10^9 objects) or nests deeper than a reviews
    file does is refused before any other code touches it."""
    obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    _check_expansion(obj, max(MIN_OBJECT_BUDGET, MAX_OBJECTS_PER_BYTE * len(data)))
    return obj


def _check_expansion(obj, budget: int) -> None:
    """Count the objects reachable from ``obj``, each shared reference counted again, up to
    ``budget``; refuse past the budget or past MAX_DEPTH levels of containers."""
    containers = (list, tuple, set, frozenset, dict)
    stack = [(obj, 0)] if isinstance(obj, containers) else []
    seen = 1
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise RefusedPickleError(f"refused: the pickle nests containers deeper than {MAX_DEPTH} levels; a "
                                     f"reviews file is a list of dicts holding a template tuple")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        seen += len(children)
        if seen > budget:
            raise RefusedPickleError(f"refused: the pickle expands to more than {budget:,} objects through shared "
                                     f"references, far more than its size can hold as reviews")
        stack.extend((child, depth + 1) for child in children if isinstance(child, containers))


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


def _describe(value) -> str:
    """A bounded description of user data: never the repr of an unbounded structure."""
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, (list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    return repr(value) if isinstance(value, (numbers.Number, type(None))) else f"a {type(value).__name__}"


def _check_record(i: int, record) -> None:
    """A PETER record: user, item (str or int), rating an integer 1..5 (int or integral float),
    template = (feature str, adjective str, sentence str, sentiment number or None)."""
    if not isinstance(record, dict) or not {"user", "item", "rating", "template"} <= record.keys():
        raise UserInputError(f"record {i} must be a dict with keys user, item, rating, template; "
                             f"got {_describe(record)}")
    for key in ("user", "item"):
        if not isinstance(record[key], (str, int)) or isinstance(record[key], bool):
            raise UserInputError(f"record {i}: {key} must be a string or an integer id, got {_describe(record[key])}")
    rating = record["rating"]
    if isinstance(rating, (bool, np.bool_)) or not isinstance(rating, numbers.Real) or not math.isfinite(rating) \
            or rating != int(rating) or not 1 <= rating <= 5:
        raise UserInputError(f"record {i}: rating must be an integer from 1 to 5, got {_describe(rating)}")
    template = record["template"]
    if not isinstance(template, (tuple, list)) or len(template) != 4:
        raise UserInputError(f"record {i}: template must be (feature, adjective, sentence, sentiment), "
                             f"got {_describe(template)}")
    for position, name in ((0, "feature"), (1, "adjective"), (2, "sentence")):
        if not isinstance(template[position], str):
            raise UserInputError(f"record {i}: the template's {name} must be a string, got "
                                 f"{_describe(template[position])}")
    sentiment = template[3]
    if sentiment is not None and (isinstance(sentiment, bool) or not isinstance(sentiment, numbers.Real)):
        raise UserInputError(f"record {i}: the template's sentiment must be a number (+1 / -1) or None, got "
                             f"{_describe(sentiment)}")


def _read_index(path: Path, n: int) -> np.ndarray:
    tokens = path.read_text().split()
    try:
        positions = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as error:
        raise UserInputError(f"{path} must hold space-separated record positions: {error}") from None
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise UserInputError(f"{path} holds positions outside [0, {n})")
    return positions


def check_splits(splits: dict[str, np.ndarray], source: str) -> None:
    """Every split non-empty (an empty one gives NaN metrics), and no record in two splits (leakage)."""
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise UserInputError(f"{source}: the {name} split is empty")
    for a, b in ((0, 1), (0, 2), (1, 2)):
        shared = np.intersect1d(splits[SPLITS[a]], splits[SPLITS[b]])
        if shared.size:
            raise UserInputError(f"{source}: record {int(shared[0])} is in both the {SPLITS[a]} and the {SPLITS[b]} "
                                 f"split ({shared.size} records are): the test would see training data")


def build(records: list[dict], splits: dict[str, np.ndarray], source: str = "the data") -> ReviewData:
    """Check the records and splits; index users, items and features; count training records per user."""
    for i, record in enumerate(records):
        _check_record(i, record)
    check_splits(splits, source)
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


def load_peter(reviews_path, index_dir=None, seed: int = 0, max_bytes: int = MAX_PICKLE_BYTES) -> ReviewData:
    """Load a PETER/PEPLER ``reviews.pickle`` (restricted unpickler: plain Python types only,
    at most ``max_bytes`` of file and a bounded number of objects, see restricted_load).

    With ``index_dir``, splits come from its train/validation/test.index files; without, from
    a seeded 8:1:1 split. Bad records and splits raise UserInputError naming them."""
    path = Path(reviews_path)
    if not path.is_file():
        raise UserInputError(f"{path} is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise RefusedPickleError(f"refused {path}: {size:,} bytes, more than the {max_bytes:,} a reviews pickle "
                                 f"is allowed (load_peter(..., max_bytes=...) raises the cap)")
    try:
        records = restricted_load(path.read_bytes())
    except RefusedPickleError as error:
        raise RefusedPickleError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise UserInputError(f"{path} is not a readable pickle: {error}") from None
    if not isinstance(records, list):
        raise UserInputError(f"{path} must hold a list of review dicts, got {_describe(records)}")
    if index_dir is None:
        splits = random_splits(len(records), seed)
    else:
        missing = [s for s in SPLITS if not (Path(index_dir) / f"{s}.index").exists()]
        if missing:
            raise UserInputError(f"{index_dir} lacks {', '.join(s + '.index' for s in missing)}")
        splits = {s: _read_index(Path(index_dir) / f"{s}.index", len(records)) for s in SPLITS}
    return build(records, splits, str(path))
