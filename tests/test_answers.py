"""The one answer rule (mia_dpo.answers) that score, select and evaluate share."""

from __future__ import annotations

import pytest

from mia_dpo.answers import normalize_answer, same_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  The red.  ", "red"),
        ("a  big\tsquare!", "big square"),
        ("An orange", "orange"),
        ("theatre", "theatre"),  # an article only as a whole word
        ("A", "a"),  # an option letter is not an article
        ("the the cat", "the cat"),  # one leading article, not every one
        ("It's 3.", "its 3"),
        ("\uff32\uff45\uff44", "red"),  # full-width letters: NFKC
        ("STRASSE", "strasse"),
        ("Stra\u00dfe", "strasse"),  # case folding, not just lower()
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_same_answer_is_the_rule_both_ways() -> None:
    assert same_answer("The red.", "red") and same_answer("red", "The red.")
    assert same_answer("  two  words. ", "Two words")
    assert not same_answer("red square", "red")
    assert not same_answer("2", "two")  # numbers are not spelled out


def test_score_select_and_evaluate_use_it() -> None:
    """One home: the stages import this rule rather than keeping their own."""
    from mia_dpo import evaluation
    from mia_dpo.stages import score, select

    assert score.same_answer is same_answer
    assert select.same_answer is same_answer
    assert evaluation.is_correct("The red.", "red")
