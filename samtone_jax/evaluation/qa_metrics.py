"""Exact match for (closed-book) question answering, with SQuAD's official answer normalisation.

`normalize_answer` is the normalisation of the SQuAD v1.1 evaluation script (also what T5's
closed-book QA evaluation and the SKILL paper's exact match use), applied in its order:

  1. lowercase (Python's str.lower, so Unicode letters too);
  2. delete every character of `string.punctuation` (ASCII only: "’", "–", "¿" are kept);
  3. replace the whole words "a", "an", "the" by a space (\\b word boundaries, Unicode-aware);
  4. collapse whitespace runs (str.split's Unicode whitespace) to one space, strip the ends.

A prediction is correct if its normalised text equals the normalised text of ANY gold answer;
`exact_match` is the fraction of correct predictions.
"""

from collections.abc import Sequence
import re
import string

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lowercase, no ASCII punctuation, no articles, single spaces."""
  text = text.lower().translate(_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_one(prediction: str, answers: str | Sequence[str]) -> bool:
  """Whether `prediction` matches any of `answers` (one string counts as a single answer)."""
  if isinstance(answers, str):
    answers = [answers]
  predicted = normalize_answer(prediction)
  return any(predicted == normalize_answer(answer) for answer in answers)


def exact_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
  """Fraction in [0, 1] of predictions that match any of their gold answers.

  Args:
    predictions: n predicted answer strings.
    answers: n entries, each the gold answers of one question (a list, or one string).

  Returns:
    the mean over questions of `exact_match_one`; 0.0 for n = 0.
  """
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions.")
  if not predictions:
    return 0.0
  return sum(exact_match_one(p, a) for p, a in zip(predictions, answers)) / len(predictions)
