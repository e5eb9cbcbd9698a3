"""Exact match equals SQuAD v1.1's official normalisation on a table of tricky answers."""

import re
import string

import pytest

from samtone_jax.evaluation import qa_metrics


def squad_normalize_answer(s):
  """Transcribed from the SQuAD v1.1 evaluation script (evaluate-v1.1.py), kept in its shape."""

  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  def lower(text):
    return text.lower()

  return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_exact_match_any(prediction, ground_truths):
  """SQuAD's metric_max_over_ground_truths(exact_match_score, ...)."""
  return max(squad_normalize_answer(prediction) == squad_normalize_answer(g)
             for g in ground_truths)


# (text, its normalisation written by hand from the rules)
TRICKY = [
    ("The Beatles", "beatles"),
    ("  the   BEATLES ", "beatles"),
    ("A Tale of Two Cities", "tale of two cities"),
    ("an apple a day", "apple day"),
    ("Theater", "theater"),                 # "the" inside a word stays
    ("Anathema", "anathema"),               # "an" / "a" inside a word stay
    ("U.S.A.", "usa"),
    ("rock 'n' roll", "rock n roll"),
    ("the-the", "thethe"),                  # punctuation goes first, then no article is left
    ("the, the", ""),                       # only articles
    ("A", ""),
    ("$1,000.00", "100000"),
    ("Café", "café"),                       # accents are kept
    ("ÉCOLE NORMALE", "école normale"),     # Unicode lowercasing
    ("Straße", "straße"),
    ("It’s", "it’s"),                       # U+2019 is not ASCII punctuation
    ("1914–1918", "1914–1918"),             # en dash kept
    ("¿Qué?", "¿qué"),                      # '?' removed, '¿' kept
    ("tab\tand\nnewline", "tab and newline"),
    ("non\u00a0breaking", "non breaking"),  # str.split splits on NBSP
    ("l'amour", "lamour"),
    ("the\u00e9 the", "theé"),              # \b is Unicode-aware: "theé" is one word
    ("", ""),
]


@pytest.mark.parametrize("text,expected", TRICKY)
def test_normalize_answer_matches_squad(text, expected):
  assert squad_normalize_answer(text) == expected  # the table itself is right
  assert qa_metrics.normalize_answer(text) == expected


def test_exact_match_any_gold_answer_matches_squad():
  predictions = ["the beatles", "Paris", "A Tale of Two Cities.", "1914–1918", "ww1", "Café",
                 "", "the"]
  answers = [["The Beatles", "Beatles"], ["London", "paris!"], ["tale of two cities"],
             ["1914-1918"], ["World War I", "WWI", "WW1"], ["cafe"], ["an"], ["nothing"]]
  reference = [squad_exact_match_any(p, a) for p, a in zip(predictions, answers)]
  assert reference == [True, True, True, False, True, False, True, False]
  assert [qa_metrics.exact_match_one(p, a) for p, a in zip(predictions, answers)] == reference
  assert qa_metrics.exact_match(predictions, answers) == pytest.approx(5 / 8)


def test_exact_match_single_string_answer_and_errors():
  assert qa_metrics.exact_match(["The Who"], ["who"]) == 1.0
  assert qa_metrics.exact_match([], []) == 0.0
  with pytest.raises(ValueError, match="2 predictions for 1 questions"):
    qa_metrics.exact_match(["a", "b"], [["a"]])
