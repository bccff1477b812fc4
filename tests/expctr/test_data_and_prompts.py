"""ExpCTR's data and texts: MovieLens-style folders, the planted-genre generator, the prompt
(which never holds its pair's label), the explanation's form and the readings."""

import numpy as np
import pytest

from gavamoe.errors import UserInputError
from gavamoe.expctr import prompts
from gavamoe.expctr.data import planted_genres, read_movielens
from gavamoe.expctr.train import explanation_stats


def _folder(tmp_path, ratings: str, movies: str | None = None):
    (tmp_path / "ratings.csv").write_text(ratings)
    (tmp_path / "movies.csv").write_text(movies or "movieId,title,genres\n10,Alpha (1990),Comedy|Drama\n"
                                         "20,Beta (1991),Horror\n30,Gamma (1992),(no genres listed)\n")
    return tmp_path


RATINGS = ("userId,movieId,rating,timestamp\n"
           "u1,10,5,100\nu1,20,2,101\nu2,10,3.5,50\nu1,30,4,300\nu2,20,4,400\n")


def test_movielens_labels_time_split_history_and_cold(tmp_path):
    data = read_movielens(_folder(tmp_path, RATINGS), test_fraction=0.4, history=1, cold_max=1)
    # time order: u2/10 (50), u1/10 (100), u1/20 (101), u1/30 (300), u2/20 (400); the last 2 are test
    assert data.user_names == ["u2", "u1"]
    assert [data.titles[i] for i in data.items] == ["Alpha (1990)", "Alpha (1990)", "Beta (1991)", "Gamma (1992)",
                                                    "Beta (1991)"]
    assert data.labels.tolist() == [0, 1, 0, 1, 1]  # rating >= 4
    assert data.train.tolist() == [True, True, True, False, False]
    assert data.history == [[0], [1]]  # each user's first training pair
    assert data.cold.tolist() == [True, False]  # u2 has 1 training pair, u1 has 2
    assert data.genres[0] == ["comedy", "drama"] and data.genres[2] == []


@pytest.mark.parametrize("ratings, movies, message", [
    ("userId,movieId,rating,timestamp\nu1,10,x,1\nu1,20,4,2\n", None, "ratings.csv:2"),
    ("userId,movieId,rating,timestamp\nu1,10,4,1\nu1,20,nan,2\n", None, "ratings.csv:3: .* must be finite"),
    ("userId,movieId,rating,timestamp\nu1,10,4,inf\nu1,20,4,2\n", None, "ratings.csv:2: .* must be finite"),
    ("userId,movieId,rating,timestamp\nu1,99,4,1\nu1,20,4,2\n", None, "item 99 is not in movies.csv"),
    ("user,movie,rating,timestamp\nu1,10,4,1\n", None, "no movieId or item column"),
    ("userId,movieId,rating,timestamp\nu1,10,4,1\n", None, "fewer than 2 ratings"),
], ids=["rating", "nan-rating", "inf-time", "item", "header", "too-few"])
def test_movielens_errors_name_the_file_and_line(tmp_path, ratings, movies, message):
    with pytest.raises(UserInputError, match=message):
        read_movielens(_folder(tmp_path, ratings, movies))


def test_movielens_missing_files(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        read_movielens(tmp_path / "absent")
    (tmp_path / "ratings.csv").write_text(RATINGS)
    with pytest.raises(UserInputError, match=r"no movies\.csv"):
        read_movielens(tmp_path)


def test_planted_genres_are_seeded_and_cold_users_have_only_their_history():
    a, b, c = planted_genres(seed=3), planted_genres(seed=3), planted_genres(seed=4)
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels, c.labels)
    per_user = np.bincount(a.users[a.train], minlength=a.num_users)
    assert set(per_user[a.cold].tolist()) == {10} and set(per_user[~a.cold].tolist()) == {40}
    assert round(a.cold.mean(), 2) == 0.3
    assert all(not (liked & disliked) for liked, disliked in zip(a.liked_genres, a.disliked_genres, strict=True))


@pytest.mark.parametrize("summary", [True, False], ids=["summary", "items-only"])
def test_the_prompt_never_contains_its_label(summary):
    data = planted_genres(num_users=30, seed=1)
    rng = np.random.default_rng(0)
    history_pairs = [p for h in data.history for p in h]
    for pair in rng.choice(history_pairs, 40).tolist() + rng.choice(data.pairs("test"), 20).tolist():
        before = prompts.prompt(data, pair, summary)
        data.labels[pair] ^= 1
        assert prompts.prompt(data, pair, summary) == before
        data.labels[pair] ^= 1
    # the same flip on another history pair of the user does change the prompt (the test can fail)
    pair = data.history[0][0]
    other = data.history[0][1]
    before = prompts.prompt(data, pair, summary)
    data.labels[other] ^= 1
    assert prompts.prompt(data, pair, summary) != before


def test_summary_counts_readings_and_warmup_explanation():
    data = planted_genres(num_users=5, seed=0)
    pair = int(data.pairs("test")[0])
    user, target = int(data.users[pair]), data.genres[int(data.items[pair])]
    text = prompts.prompt(data, pair)
    for genre in target:
        liked = sum(genre in data.genres[data.items[p]] for p in data.history[user] if data.labels[p] == 1)
        disliked = sum(genre in data.genres[data.items[p]] for p in data.history[user] if data.labels[p] == 0)
        assert f"{genre} {liked} liked {disliked} disliked" in text
        assert prompts.reading(data, pair, genre) == int(np.sign(liked - disliked))
    warm = prompts.warmup_explanation(data, pair, np.random.default_rng(0))
    clauses, verdict = prompts.parse(warm)
    assert clauses == prompts.true_readings(data, pair) and verdict in prompts.SENTIMENTS


def test_parse_judge_answer_and_form():
    text = " the target is comedy, a liked genre, and horror, a new genre, so the user would enjoy it."
    assert prompts.parse(text) == ([("comedy", 1), ("horror", 0)], "enjoy")
    assert prompts.explanation([("comedy", 1), ("horror", 0)], "enjoy") == text
    assert prompts.judge_answer(text) == " yes"
    assert prompts.judge_answer(text.replace("enjoy", "dislike")) == " no"
    assert prompts.judge_answer("the user would enjoy and dislike it") is None
    for bad in ("the target is. is action,", "the target is comedy, a liked genre, so the user would enjoy",
                "the target is comedy, a fine genre, so the user would enjoy it."):
        assert not prompts.well_formed(bad)


def test_common_sense_verdict_and_a_label_free_warm_up():
    rng = np.random.default_rng(0)
    assert prompts.common_sense_verdict([("comedy", 1), ("horror", 0)], rng, prior=1.0) == "enjoy"
    assert prompts.common_sense_verdict([("comedy", 1), ("horror", -1), ("drama", -1)], rng, prior=1.0) == "dislike"
    ties = [prompts.common_sense_verdict([("comedy", 1), ("horror", -1)], rng, prior=1.0) for _ in range(400)]
    assert 0.4 < ties.count("enjoy") / 400 < 0.6  # a tie is a coin flip
    assert {prompts.common_sense_verdict([("comedy", 1), ("horror", -1)], rng, 0.5, cautious=True)
            for _ in range(50)} == {"dislike"}  # a cautious tie
    leaning = [prompts.common_sense_verdict([("comedy", 1)], rng, prior=0.5) for _ in range(4000)]
    assert abs(leaning.count("enjoy") / 4000 - 0.75) < 0.03  # prior + (1 - prior) / 2
    data = planted_genres(num_users=20, seed=2)
    for pair in data.pairs("train")[:50].tolist():
        before = prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 0.5)
        data.labels[pair] ^= 1
        assert prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 0.5) == before
        data.labels[pair] ^= 1


def test_random_warmup_readings_keep_the_form_and_know_no_label():
    data = planted_genres(num_users=20, seed=3)
    said = []
    for pair in data.pairs("train")[:60].tolist():
        text = prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 1.0, readings="random")
        clauses, verdict = prompts.parse(text)
        assert [g for g, _ in clauses] == prompts.target_genres(data, pair)
        lean = sum(r for _, r in clauses)
        if lean:  # prior 1: the verdict follows the readings it states
            assert verdict == prompts.SENTIMENTS[0 if lean > 0 else 1]
        said += [r for _, r in clauses]
        data.labels[pair] ^= 1
        assert prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 1.0, readings="random") == text
        data.labels[pair] ^= 1
    assert set(said) == {-1, 0, 1}
    with pytest.raises(ValueError, match="readings must be one of"):
        prompts.warmup_explanation(data, 0, np.random.default_rng(0), readings="label")


def test_hedged_warmup_readings_say_new_or_the_prompts_reading_and_know_no_label():
    data = planted_genres(num_users=40, seed=5)
    hedged = kept = 0
    for pair in data.pairs("train")[:200].tolist():
        text = prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 1.0, readings="hedged", hedge=0.6)
        clauses, verdict = prompts.parse(text)
        lean = sum(r for _, r in clauses)  # prior 1, and a cautious reader's tie is "dislike"
        assert verdict == prompts.SENTIMENTS[0 if lean > 0 else 1]
        for (_, said), (_, true) in zip(clauses, prompts.true_readings(data, pair), strict=True):
            assert said in (0, true)  # the prompt's reading, or "a new genre"
            if true:
                hedged, kept = hedged + (said == 0), kept + (said == true)
        data.labels[pair] ^= 1
        again = prompts.warmup_explanation(data, pair, np.random.default_rng(pair), 1.0, readings="hedged", hedge=0.6)
        assert again == text
        data.labels[pair] ^= 1
    assert hedged + kept > 100 and abs(hedged / (hedged + kept) - 0.6) < 0.1
    for hedge, keeps_the_prompts in ((0.0, True), (1.0, False)):
        for pair in data.pairs("train")[:20].tolist():
            clauses, _ = prompts.parse(prompts.warmup_explanation(data, pair, np.random.default_rng(0), 1.0,
                                                                  readings="hedged", hedge=hedge))
            truth = prompts.true_readings(data, pair)
            assert clauses == (truth if keeps_the_prompts else [(g, 0) for g, _ in truth])
    with pytest.raises(ValueError, match="hedge must be in"):
        prompts.warmup_explanation(data, 0, np.random.default_rng(0), readings="hedged", hedge=1.5)


def test_explanation_stats_count_liked_genres_named_by_hand():
    data = planted_genres(num_users=10, seed=4)
    pairs = data.pairs("test")
    positive = next(p for p in pairs if data.labels[p] == 1)
    negative = next(p for p in pairs if data.labels[p] == 0)
    user = data.users[positive]
    liked, disliked = sorted(data.liked_genres[user]), sorted(data.disliked_genres[user])
    texts = [prompts.explanation([(liked[0], 1)], "enjoy"),  # names a planted liked genre as liked
             prompts.explanation([(disliked[0], 1)], "enjoy"),  # a disliked genre read as liked: not counted
             prompts.explanation([(liked[0], 0)], "dislike"),  # a liked genre not read as liked: not counted
             "not an explanation"]
    stats = explanation_stats(data, np.array([positive] * 3 + [negative]), texts)
    assert stats["positive_names_liked"] == pytest.approx(1 / 3)
    assert stats["negative_names_liked"] == 0.0
    assert stats["well_formed"] == 0.75 and stats["positive_says_enjoy"] == pytest.approx(2 / 3)
