"""Metrics of spec §4: SQuAD normalisation, token F1 (with the unanswerable
rule), EM, accuracy with ReCoRD membership, and the error cases."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import (  # noqa: E402
    VALID_METRICS,
    Prediction,
    calculate_metric,
    exact_match,
    example_score,
    f1,
    f1_score,
    normalize_answer,
)


# ---------------------------------------------------------------- normalize_answer
@pytest.mark.parametrize("raw, expected", [
    ("The Cat!", "cat"),
    ("Denver Broncos", "denver broncos"),
    ("An apple, a pear, and THE banana.", "apple pear and banana"),
    ("theory of the thing", "theory of thing"),  # "the" inside a word stays
    ("anthem at a bar", "anthem at bar"),
    ("  multiple   spaces\t\nhere ", "multiple spaces here"),
    ("don't", "dont"),  # punctuation is deleted, not turned into a space
    ("U.S.A.", "usa"),
    ("the-end", "theend"),  # punctuation goes before articles, so "the" is no longer a word
    ("a", ""),
    ("The.", ""),
    ("", ""),
    ("\u201cquoted\u201d", "\u201cquoted\u201d"),  # curly quotes are not in string.punctuation
    ("24\u201310", "24\u201310"),  # nor is the en dash
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- F1
def test_f1_partial_overlap_exact_value():
    # pred [cat, sat] vs gold [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3.
    assert f1_score("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)


def test_f1_counts_repeated_tokens_as_a_multiset():
    # overlap = min(3, 2) red = 2; P = 2/4, R = 2/3, F1 = 4/7.
    assert f1_score("red red red blue", ["red red green"]) == pytest.approx(4 / 7)
    # Repeating a matching token does not raise recall above the gold count.
    assert f1_score("cat cat", ["cat"]) == pytest.approx(2 / 3)


def test_f1_zero_overlap_and_empty_prediction():
    assert f1_score("dog", ["cat"]) == 0.0
    assert f1_score("", ["cat"]) == 0.0
    assert f1_score("The.", ["cat"]) == 0.0  # normalises to nothing
    # Both empty after normalisation still score 0 (MeZO, unlike SQuAD v2's 1).
    assert f1_score("", ["the"]) == 0.0


def test_f1_is_case_punctuation_and_article_insensitive():
    assert f1_score("The Denver Broncos.", ["denver broncos"]) == 1.0


def test_f1_takes_max_over_golds():
    assert f1_score("Denver Broncos", ["Broncos", "Denver Broncos", "Carolina"]) == 1.0
    # vs "Denver Broncos": P = 1, R = 1/2 -> 2/3; vs "Broncos": 0.
    assert f1_score("Denver", ["Denver Broncos", "Broncos"]) == pytest.approx(2 / 3)


def test_f1_accepts_single_gold_string():
    assert f1_score("cat", "cat") == 1.0
    assert f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)


def test_f1_unanswerable_gold_requires_exact_match():
    assert f1_score("CANNOTANSWER", ["CANNOTANSWER"]) == 1.0
    assert f1_score("cannotanswer.", ["CANNOTANSWER"]) == 1.0  # compared after normalisation
    assert f1_score("cannot answer", ["CANNOTANSWER"]) == 0.0
    assert f1_score("No answer", ["no answer"]) == 1.0
    assert f1_score("answer", ["no answer"]) == 0.0  # token F1 would give 2/3
    assert f1_score("no answer here", ["no answer"]) == 0.0


def test_f1_unanswerable_rule_looks_at_first_gold_only():
    assert f1_score("house", ["CANNOTANSWER", "house"]) == 0.0
    assert f1_score("house", ["the house", "CANNOTANSWER"]) == 1.0


def test_f1_needs_a_gold():
    with pytest.raises(ValueError):
        f1_score("x", [])


def test_f1_alias():
    assert f1 is f1_score


# ---------------------------------------------------------------- EM
def test_exact_match():
    assert exact_match("The Cat.", ["a cat"]) == 1.0
    assert exact_match("cat sat", ["cat"]) == 0.0
    assert exact_match("Broncos", ["Denver Broncos", "broncos!"]) == 1.0
    assert exact_match("Broncos", "Broncos") == 1.0
    assert isinstance(exact_match("a", ["b"]), float)
    with pytest.raises(ValueError):
        exact_match("x", [])


# ---------------------------------------------------------------- calculate_metric
def test_accuracy_equality():
    preds = [Prediction(1, 1), Prediction(1, 0), Prediction(2, 2), Prediction(0, 0)]
    assert calculate_metric(preds, "accuracy") == 0.75


def test_accuracy_copa_strings():
    preds = [Prediction("He dropped a hammer on his foot.", "He dropped a hammer on his foot."),
             Prediction("He dropped a hammer on his foot.", "He got a hole in his sock.")]
    assert calculate_metric(preds, "accuracy") == 0.5


def test_accuracy_record_membership():
    preds = [
        Prediction(["Munich", "Germany"], "Germany"),
        Prediction(["Munich"], "Berlin"),
        Prediction([3, 5], 5),  # index form, as the evaluator passes it
        Prediction([3, 5], 4),
    ]
    assert calculate_metric(preds, "accuracy") == 0.5


def test_accuracy_accepts_pairs_and_generators():
    assert calculate_metric([(1, 1), (0, 1)], "accuracy") == 0.5
    assert calculate_metric((Prediction(i, i) for i in range(3)), "accuracy") == 1.0


def test_em_and_f1_means():
    preds = [Prediction(["cat sat on mat"], "the cat sat"), Prediction(["X", "y"], "x.")]
    assert calculate_metric(preds, "f1") == pytest.approx((2 / 3 + 1) / 2)
    assert calculate_metric(preds, "em") == 0.5


def test_f1_mean_with_unanswerable_example():
    preds = [Prediction(["CANNOTANSWER"], "CANNOTANSWER"), Prediction(["no answer"], "answer"),
             Prediction(["red red green"], "red red red blue")]
    assert calculate_metric(preds, "f1") == pytest.approx((1 + 0 + 4 / 7) / 3)


def test_metric_returns_python_float():
    assert type(calculate_metric([Prediction(1, 1)], "accuracy")) is float


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ValueError) as err:
        calculate_metric([Prediction(1, 1)], "macro_f1")
    for name in ("accuracy", "em", "f1"):
        assert name in str(err.value)
    assert VALID_METRICS == ("accuracy", "em", "f1")


@pytest.mark.parametrize("name", ["accuracy", "em", "f1"])
def test_empty_predictions_raise(name):
    with pytest.raises(ValueError):
        calculate_metric([], name)


# ---------------------------------------------------------------- example_score
def test_example_score():
    assert example_score("accuracy", 1, 1) == 1.0
    assert example_score("accuracy", 0, 1) == 0.0
    assert example_score("accuracy", "Munich", ["Germany", "Munich"]) == 1.0
    assert example_score("em", "the Cat", ["cat"]) == 1.0
    assert example_score("f1", "the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)
    assert example_score("f1", "CANNOTANSWER", ["CANNOTANSWER"]) == 1.0
    with pytest.raises(ValueError):
        example_score("bleu", "a", ["a"])


def test_example_score_matches_mean():
    preds = [Prediction(["cat sat on mat"], "the cat sat"), Prediction(["dog"], "cat")]
    scores = [example_score("f1", p.predicted_candidate, p.correct_candidate) for p in preds]
    assert calculate_metric(preds, "f1") == pytest.approx(sum(scores) / len(scores))
