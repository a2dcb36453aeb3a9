"""Evaluation metrics of the MeZO large-model suite (spec §4).

These reproduce MeZO's metrics, not the official task metrics: ReCoRD is
scored by entity membership, CB and MultiRC by plain accuracy, and DROP by
SQuAD-style token F1. Numbers are therefore comparable with the MeZO paper but
not with SuperGLUE or DROP leaderboards.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

VALID_METRICS = ("accuracy", "em", "f1")

# Golds that mean "unanswerable" (QuAC's CANNOTANSWER, and "no answer"): when
# the first gold is one of these, partial token overlap is meaningless, so
# only an exact (normalised) match scores.
NO_ANSWER_GOLDS = ("CANNOTANSWER", "no answer")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class Prediction:
    correct_candidate: Any
    predicted_candidate: Any


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop the articles
    a/an/the as whole words, collapse whitespace (in that order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_list(golds: str | Sequence[str]) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one gold answer is required")
    return golds


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    # Also covers empty token lists: an empty prediction or an empty
    # normalised gold scores 0, even when both are empty (MeZO behaviour).
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Per-example token F1: max over golds, or 0/1 exact match when the
    first gold marks the question as unanswerable."""
    golds = _gold_list(golds)
    normalized_prediction = normalize_answer(prediction)
    if golds[0] in NO_ANSWER_GOLDS:
        return float(normalize_answer(golds[0]) == normalized_prediction)
    prediction_tokens = normalized_prediction.split()
    return max(_token_f1(prediction_tokens, normalize_answer(g).split()) for g in golds)


# Name used by the spec for the non-differentiable training objective.
f1 = f1_score


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    normalized_prediction = normalize_answer(prediction)
    return float(any(normalize_answer(g) == normalized_prediction for g in _gold_list(golds)))


def accuracy(prediction: Any, gold: Any) -> float:
    # ReCoRD has several correct entities: any of them counts.
    if isinstance(gold, list):
        return float(prediction in gold)
    return float(prediction == gold)


_SCORERS = {"accuracy": accuracy, "em": exact_match, "f1": f1_score}


def _scorer(metric_name: str):
    try:
        return _SCORERS[metric_name]
    except KeyError:
        raise ValueError(
            f"unknown metric {metric_name!r}; valid metrics: {', '.join(VALID_METRICS)}"
        ) from None


def example_score(metric_name: str, prediction: Any, gold: Any) -> float:
    """Score of one example; usable as a non-differentiable objective
    (e.g. the negative F1 of a greedy generation)."""
    return _scorer(metric_name)(prediction, gold)


def _unpack(prediction: Any) -> tuple[Any, Any]:
    if hasattr(prediction, "correct_candidate"):
        return prediction.correct_candidate, prediction.predicted_candidate
    correct, predicted = prediction
    return correct, predicted


def calculate_metric(predictions: Iterable[Any], metric_name: str) -> float:
    """Mean per-example score over ``predictions``.

    Each item is a ``Prediction`` (or any object with ``correct_candidate``
    and ``predicted_candidate``) or a ``(correct, predicted)`` pair.
    """
    scorer = _scorer(metric_name)
    scores = [scorer(predicted, correct) for correct, predicted in map(_unpack, predictions)]
    # A mean over nothing would be reported as 0 or NaN and hide a bug upstream.
    if not scores:
        raise ValueError("cannot compute a metric over an empty list of predictions")
    return math.fsum(scores) / len(scores)
