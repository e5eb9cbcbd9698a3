"""Retrieval evaluation sets: queries, a corpus and graded qrels, by name.

Data modules (MS MARCO dev, MultiReQA test pools, BEIR directories, the demo) register a loader
under a stable name; the evaluation code (`samtone_jax.evaluation`) asks for it with
`get_eval_set(name)` and never reads files itself.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import difflib

import seqio

from samtone_jax import errors


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One retrieval evaluation set.

  Attributes:
    name: registry name, e.g. "msmarco_passage_dev_small".
    queries: query id -> query text.
    corpus: document id -> document text (title already joined to the body where the format has one):
      a dict, or a Mapping that reads texts on demand (MS MARCO's `msmarco.Collection`: an offset
      index into collection.tsv); read it through `document_ids` / `document_texts`.
    qrels: query id -> {document id -> graded relevance (int, > 0 relevant)}.
    vocabulary: the tokeniser used for both queries and documents.
    query_length: token length queries are truncated/padded to.
    document_length: token length documents are truncated/padded to.
    protocol: "msmarco" (MRR@10, Recall@1000), "multireqa" (P@1, MRR), "beir" (nDCG@10, Recall@100).
  """

  name: str
  queries: dict[str, str]
  corpus: Mapping[str, str]
  qrels: dict[str, dict[str, int]]
  vocabulary: seqio.Vocabulary
  query_length: int = 64
  document_length: int = 256
  protocol: str = "beir"


class _TextsOf(Sequence):
  """The texts of `ids` in a corpus mapping, looked up on indexing (no list of all texts)."""

  def __init__(self, corpus: Mapping[str, str], ids: Sequence[str]):
    self._corpus, self._ids = corpus, ids

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._corpus[i] for i in self._ids[index]]
    return self._corpus[self._ids[index]]


def document_ids(corpus: Mapping[str, str]) -> Sequence[str]:
  """The corpus's ids in its order (a corpus with an `ids` sequence gives it: no list of n ids)."""
  ids = getattr(corpus, "ids", None)
  return list(corpus) if ids is None else ids


def document_texts(corpus: Mapping[str, str], ids: Sequence[str]) -> Sequence[str]:
  """The texts of `document_ids(corpus)`, as a sequence read on indexing or slicing."""
  texts = getattr(corpus, "texts", None)
  return _TextsOf(corpus, ids) if texts is None else texts


_EVAL_SETS: dict[str, Callable[[], EvalSet]] = {}


def register_eval_set(name: str, loader: Callable[[], EvalSet], *, overwrite: bool = False) -> None:
  """Registers a loader (called lazily, so registering never touches the disk)."""
  if name in _EVAL_SETS and not overwrite:
    raise ValueError(f"Evaluation set {name!r} is already registered.")
  _EVAL_SETS[name] = loader


def check_registered(names: Sequence[str], binding: str = "EVAL_TASKS") -> None:
  """Raises ConfigError naming the first of `names` that is not registered (and a near name)."""
  for name in names:
    if name not in _EVAL_SETS:
      close = difflib.get_close_matches(str(name), sorted(_EVAL_SETS), n=1)
      raise errors.ConfigError(
          f"{binding} names {name!r}, which is not a registered evaluation set"
          + (f"; did you mean {close[0]!r}?" if close else
             f"; registered: {', '.join(sorted(_EVAL_SETS))}")
          + " (BEIR directories under $SAMTONE_DATA_DIR/beir/<name>/ register "
          "beir_<name>_<split>).")


def get_eval_set(name: str) -> EvalSet:
  """Loads the registered evaluation set `name` (ConfigError if there is none)."""
  check_registered([name], "the evaluation set")
  return _EVAL_SETS[name]()


def registered_eval_sets() -> list[str]:
  return sorted(_EVAL_SETS)
