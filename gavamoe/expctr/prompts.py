"""The texts of ExpCTR: the explanation prompt, the form of an explanation, and the question the
LLM answers about its own explanation (ExpCTR-LLM and the LC reward).

A prompt holds the user's liked and disliked history items (title and genres) and the target
item; never the pair's label, and never the target among the history. With ``summary`` it ends
with, for each of the target's first ``MAX_GENRES`` genres, how many liked and disliked history
items have it. An explanation says how the user would view the item and why, reason first: each
of those genres with how it stands in the user's history, then the verdict,
``the target is <genre>, <reading>[, and <genre>, <reading>], so the user would <enjoy|dislike> it.``
where a reading says whether the history shows the genre on more liked items ("a liked genre"),
more disliked ones ("a disliked genre") or as many ("a new genre").
"""

from __future__ import annotations

import re

import numpy as np

from .data import CtrData

SENTIMENTS = ("enjoy", "dislike")  # the explanation's verdict words; the first one means a click
ANSWERS = (" yes", " no")  # the judge's answers, in the order of SENTIMENTS
QUESTION = " will the user click? answer:"
READINGS = {1: "a liked genre", -1: "a disliked genre", 0: "a new genre"}
NO_GENRE = "story"
MAX_GENRES = 3  # genres of the target an explanation (and the summary) goes through


def _item(data: CtrData, item: int) -> str:
    genres = ", ".join(data.genres[item]) or "no genre"
    return f"{data.titles[item]} ({genres})" if data.titles_in_prompt else f"({genres})"


def _shown_history(data: CtrData, pair: int) -> list[int]:
    return [p for p in data.history[int(data.users[pair])] if p != pair]


def _counts(data: CtrData, pair: int, genre: str) -> tuple[int, int]:
    """How many liked and disliked items of the shown history have ``genre``."""
    liked = disliked = 0
    for p in _shown_history(data, pair):
        if genre in data.genres[int(data.items[p])]:
            liked, disliked = (liked + 1, disliked) if data.labels[p] == 1 else (liked, disliked + 1)
    return liked, disliked


def target_genres(data: CtrData, pair: int) -> list[str]:
    return data.genres[int(data.items[pair])][:MAX_GENRES] or [NO_GENRE]


def prompt(data: CtrData, pair: int, summary: bool = True) -> str:
    """The explanation prompt of one pair (its label is not in it; see the module docstring)."""
    shown = _shown_history(data, pair)
    liked = "; ".join(_item(data, int(data.items[p])) for p in shown if data.labels[p] == 1) or "none"
    disliked = "; ".join(_item(data, int(data.items[p])) for p in shown if data.labels[p] == 0) or "none"
    text = f"liked: {liked}. disliked: {disliked}. target: {_item(data, int(data.items[pair]))}."
    if summary:
        counts = [(g, *_counts(data, pair, g)) for g in target_genres(data, pair)]
        text += " history: " + "; ".join(f"{g} {n} liked {m} disliked" for g, n, m in counts) + "."
    return text + " explanation:"


def explanation(readings: list[tuple[str, int]], sentiment: str) -> str:
    """The explanation that goes through (genre, reading) pairs and ends with the verdict."""
    clauses = ", and ".join(f"{g}, {READINGS[r]}" for g, r in readings)
    return f" the target is {clauses}, so the user would {sentiment} it."


def reading(data: CtrData, pair: int, genre: str) -> int:
    """How ``genre`` stands in the history the prompt shows: 1 if it is on more liked items than
    disliked ones, -1 if fewer, 0 if as many (none included). A function of the prompt's text."""
    liked, disliked = _counts(data, pair, genre)
    return int(np.sign(liked - disliked))


def true_readings(data: CtrData, pair: int) -> list[tuple[str, int]]:
    return [(g, reading(data, pair, g)) for g in target_genres(data, pair)]


def common_sense_verdict(readings: list[tuple[str, int]], rng: np.random.Generator, prior: float,
                         cautious: bool = False) -> str:
    """The warm-up's verdict: with probability ``prior``, what the readings suggest (enjoy when
    the target has more liked than disliked genres, dislike when fewer); otherwise a coin flip.
    On a tie, a coin flip too, or with ``cautious`` "dislike" (nothing speaks for the item). A
    function of the prompt's text and chance, never of the label."""
    lean = sum(r for _, r in readings)
    if lean == 0 and cautious:
        return SENTIMENTS[1]
    if lean != 0 and rng.random() < prior:
        return SENTIMENTS[0] if lean > 0 else SENTIMENTS[1]
    return SENTIMENTS[int(rng.integers(2))]


WARMUP_READINGS = ("prompt", "random", "hedged")


def warmup_explanation(data: CtrData, pair: int, rng: np.random.Generator, prior: float = 0.5,
                       readings: str = "prompt", hedge: float = 0.6) -> str:
    """A well-formed explanation that knows nothing of the pair's label (see ``llm``, the label-free
    warm-up): each genre's reading is the prompt's (``readings="prompt"``), drawn at random
    (``"random"``: the form without the reading), or the prompt's except that it is "a new genre"
    with probability ``hedge`` (``"hedged"``: a cautious reader, whose likeliest reading of every
    genre is "new" when ``hedge`` > 1/2, and whose verdict on a tie is "dislike"); then the
    common-sense verdict of those readings."""
    if readings not in WARMUP_READINGS:
        raise ValueError(f"readings must be one of {WARMUP_READINGS}, got {readings!r}")
    if not 0 <= hedge <= 1:
        raise ValueError(f"hedge must be in [0, 1], got {hedge}")
    if readings == "prompt":
        said = true_readings(data, pair)
    elif readings == "random":
        said = [(g, int(rng.integers(-1, 2))) for g in target_genres(data, pair)]
    else:
        said = [(g, 0 if rng.random() < hedge else r) for g, r in true_readings(data, pair)]
    return explanation(said, common_sense_verdict(said, rng, prior, cautious=readings == "hedged"))


def judge_answer(text: str) -> str | None:
    """The answer an explanation's verdict word states, if it has exactly one."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    found = [a for s, a in zip(SENTIMENTS, ANSWERS, strict=True) if s in words]
    return found[0] if len(found) == 1 else None


_CLAUSE = r"([a-z' -]+), (" + "|".join(READINGS.values()) + ")"
FORM = re.compile(rf"^ ?the target is {_CLAUSE}((?:, and {_CLAUSE})*), so the user would ("
                  + "|".join(SENTIMENTS) + r") it\.$")


def parse(text: str) -> tuple[list[tuple[str, int]], str] | None:
    """(genre, reading) clauses and the verdict of a well-formed explanation, else None."""
    match = FORM.match(text)
    if match is None:
        return None
    body = text.strip()[len("the target is "):text.strip().rindex(", so the user would")]
    by_text = {v: k for k, v in READINGS.items()}
    clauses = [c.rsplit(", ", 1) for c in body.split(", and ")]
    return [(g, by_text[r]) for g, r in clauses], match.group(match.lastindex)


def well_formed(text: str) -> bool:
    """Whether a generated explanation is in the explanation's form."""
    return parse(text) is not None
