"""When two answers are the same answer: one rule for every stage.

Score drops a response that equals the ground truth (it cannot be a *rejected*
answer), select never pairs an answer with itself, and evaluate counts a prediction
right when it equals the reference. All three must agree, or a right answer could be
trained on as a wrong one (docs/method.md §3 and §6).

The rule: Unicode NFKC, case-folded, punctuation (any Unicode `P*` character)
removed, whitespace runs collapsed, then one leading article (a / an / the, as a
whole word) dropped. So "The red." equals "red", "It's 3." equals "its 3", and an
option letter "A" stays "a".
"""

from __future__ import annotations

import re
import unicodedata

_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _LEADING_ARTICLE.sub("", " ".join(text.split()))


def same_answer(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)
