"""MultiReQA: retrieval question answering over the sentences of the MRQA datasets.

Questions and contexts come from MRQA (https://github.com/mrqa/MRQA-Shared-Task-2019), either the
official `.jsonl.gz` files or TFDS `mrqa/<config>`; the sentence boundaries come from MultiReQA
(https://github.com/google-research-datasets/MultiReQA, `data/<split>/<Name>/candidates.json.gz`),
one JSON object per line:

  {"candidate_id": "SQuAD_<qid>/<qid>/.../_<k>", "response_start": 101, "response_end": 239}

where the qids are those of every question on one MRQA context, `k` numbers the context's
sentences, and the sentence is `context[response_start:response_end]`. A question's answer
sentence is the candidate that contains the start of its first detected answer span (MRQA
`char_spans` are inclusive [start, end] character offsets into the context).

Files under `paths.multireqa_dir()` (or a given directory):
  mrqa/train/<Name>.jsonl.gz        MRQA training files (the five in-domain datasets)
  mrqa/dev/<Name>.jsonl.gz          MRQA development files (all eight; MultiReQA's test data)
  candidates/<split>/<Name>/candidates.json.gz   MultiReQA's data/ directory, as published
                                    (test data of in-domain sets is under split "dev")

Registered names (dataset names lowercase: searchqa, triviaqa, hotpotqa, naturalquestions, squad,
bioasq, relationextraction, textbookqa):
  "multireqa_<dataset>_train"   (question, answer sentence) pairs, in-domain datasets only
  "multireqa_in_domain"         mixture of the five training tasks, rates = MRQA training sizes
  eval set "multireqa_<dataset>_test"   all eight: the questions and the dataset's whole candidate
                                 pool, relevant = sentences containing a detected answer start.
"""

from collections.abc import Iterable, Iterator
import dataclasses
import functools
import logging
import os
import re

import numpy as np
import seqio

from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import features
from samtone_jax.tasks import paths
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  file_name: str    # MRQA / MultiReQA spelling, e.g. "SQuAD"
  tfds_config: str  # TFDS mrqa/<config>
  in_domain: bool   # has a MultiReQA training split
  train_size: int   # MRQA training questions (mixture rate); 0 for test-only sets


DATASETS = {
    "searchqa": DatasetInfo("SearchQA", "search_qa", True, 117_384),
    "triviaqa": DatasetInfo("TriviaQA", "trivia_qa", True, 61_688),
    "hotpotqa": DatasetInfo("HotpotQA", "hotpot_qa", True, 72_928),
    "naturalquestions": DatasetInfo("NaturalQuestions", "natural_questions", True, 104_071),
    "squad": DatasetInfo("SQuAD", "squad", True, 86_588),
    "bioasq": DatasetInfo("BioASQ", "bio_asq", False, 0),
    "relationextraction": DatasetInfo("RelationExtraction", "relation_extraction", False, 0),
    "textbookqa": DatasetInfo("TextbookQA", "textbook_qa", False, 0),
}
IN_DOMAIN_MIXTURE = "multireqa_in_domain"
_CANDIDATE_ID = re.compile(r"^(?P<dataset>[A-Za-z]+)_(?P<qids>.+)/_(?P<index>\d+)$")
_HOW_TO_GET = ("Download the MRQA files from https://github.com/mrqa/MRQA-Shared-Task-2019 "
               "(e.g. https://s3.us-east-2.amazonaws.com/mrqa/release/v2/train/SQuAD.jsonl.gz and "
               ".../v2/dev/SQuAD.jsonl.gz) into <dir>/mrqa/{train,dev}/, and copy the data/ "
               "directory of https://github.com/google-research-datasets/MultiReQA to "
               "<dir>/candidates/; <dir> is SAMTONE_MULTIREQA_DIR or "
               "paths.configure_data_dirs(multireqa_dir=...).")


@dataclasses.dataclass(frozen=True)
class Candidate:
  candidate_id: str
  start: int
  end: int
  line: int  # in the candidates file, for error messages


@dataclasses.dataclass(frozen=True)
class Context:
  """One MRQA context: its text and its questions (qid, question, answer char spans)."""
  text: str
  questions: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...]
  where: str  # "file, line N" or the TFDS split, for error messages


@dataclasses.dataclass(frozen=True)
class Sentences:
  """A dataset split in MultiReQA form."""
  questions: dict[str, str]                 # qid -> question
  sentences: dict[str, str]                 # candidate_id -> document text
  answers: dict[str, dict[str, int]]        # qid -> {candidate_id: 1}
  pairs: tuple[tuple[str, str], ...]        # (question, answer document) per question


def read_candidates(path: str, file_name: str) -> dict[frozenset[str], list[Candidate]]:
  """candidates.json.gz -> {frozenset(context qids): sentences of that context}."""
  grouped: dict[frozenset[str], list[Candidate]] = {}
  required = {"candidate_id": str, "response_start": int, "response_end": int}
  for line, obj in readers.iter_jsonl(path, required):
    match = _CANDIDATE_ID.match(obj["candidate_id"])
    if not match or match.group("dataset") != file_name:
      raise readers.DataFormatError(path, line, f"candidate_id {obj['candidate_id']!r} is not "
                                    f"'{file_name}_<qid>[/<qid>...]/_<k>'")
    start, end = obj["response_start"], obj["response_end"]
    if not 0 <= start < end:
      raise readers.DataFormatError(path, line, f"bad sentence offsets [{start}, {end})")
    key = frozenset(match.group("qids").split("/"))
    grouped.setdefault(key, []).append(Candidate(obj["candidate_id"], start, end, line))
  return grouped


def read_mrqa_jsonl(path: str) -> Iterator[Context]:
  """MRQA .jsonl.gz: a {"header": ...} line, then one context with its "qas" per line."""
  for line, obj in readers.iter_jsonl(path):
    if line == 1:
      if "header" not in obj:
        raise readers.DataFormatError(path, 1, "expected the MRQA header line {\"header\": ...}")
      continue
    for field, field_type in (("context", str), ("qas", list)):
      if not isinstance(obj.get(field), field_type):
        raise readers.DataFormatError(path, line, f"missing or bad field {field!r}")
    questions = []
    for qa in obj["qas"]:
      try:
        spans = tuple((int(s), int(e)) for answer in qa["detected_answers"]
                      for s, e in answer["char_spans"])
        questions.append((readers.check_str_id(path, line, "qid", qa["qid"]),
                          readers.check_text(path, line, "question", qa["question"]), spans))
      except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, readers.DataFormatError):
          raise
        raise readers.DataFormatError(path, line, f"bad qas entry ({type(e).__name__}: {e}); "
                                      "expected qid, question, detected_answers[].char_spans")
    yield Context(obj["context"], tuple(questions), f"{path}, line {line}")


def _nested_list(value) -> list:
  return value.to_list() if hasattr(value, "to_list") else np.asarray(value).tolist()


def read_mrqa_tfds(config: str, split: str) -> Iterator[Context]:
  """TFDS mrqa/<config>: questions grouped back into their contexts (first-seen order).

  TFDS strips each context; MultiReQA's offsets refer to the MRQA file's context, so a context
  with leading whitespace would shift (the MRQA .jsonl.gz files are the reference input).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(f"mrqa/{config}", data_dir=paths.tfds_data_dir())
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except (AssertionError, FileNotFoundError, ValueError) as e:
    raise readers.MissingDataError(
        f"TFDS dataset mrqa/{config} (split {split!r})", builder.data_dir,
        f"Prepare it with `tfds build mrqa/{config}` into the TFDS data dir (TFDS_DATA_DIR or "
        "paths.configure_data_dirs(tfds_data_dir=...)).") from e
  contexts: dict[str, list] = {}
  for ex in tfds.as_numpy(ds):
    # char_spans is [answers, spans], ragged: a RaggedTensor (or an array when rectangular).
    starts, ends = (_nested_list(ex["detected_answers"]["char_spans"][k]) for k in ("start", "end"))
    spans = tuple((int(s), int(e)) for row_starts, row_ends in zip(starts, ends)
                  for s, e in zip(row_starts, row_ends))
    contexts.setdefault(ex["context"].decode("utf-8"), []).append(
        (ex["qid"].decode("utf-8"), ex["question"].decode("utf-8"), spans))
  for text, questions in contexts.items():
    yield Context(text, tuple(questions), f"tfds mrqa/{config}:{split}")


def build_sentences(contexts: Iterable[Context], candidates: dict[frozenset[str], list[Candidate]],
                    candidates_path: str, *, append_context: bool = False) -> Sentences:
  """Joins MRQA contexts with MultiReQA sentence boundaries.

  A question whose answer start lies in no candidate sentence, or a context without candidates
  (MultiReQA did not annotate every MRQA context), is skipped and counted in a warning.
  """
  questions, sentences, answers, pairs = {}, {}, {}, []
  skipped_questions = skipped_contexts = 0
  for context in contexts:
    key = frozenset(qid for qid, _, _ in context.questions)
    pool = candidates.get(key)
    if pool is None:
      skipped_contexts += 1
      continue
    texts = {}
    for c in pool:
      if c.end > len(context.text):
        raise readers.DataFormatError(candidates_path, c.line, f"sentence end {c.end} is past the "
                                      f"end of its context ({len(context.text)} characters, "
                                      f"{context.where})")
      sentence = context.text[c.start:c.end].strip()
      if not sentence:
        raise readers.DataFormatError(candidates_path, c.line, "empty sentence")
      texts[c.candidate_id] = f"{sentence} {context.text.strip()}" if append_context else sentence
    sentences.update(texts)
    for qid, question, spans in context.questions:
      relevant = {c.candidate_id: 1 for c in pool for s, _ in spans if c.start <= s < c.end}
      first = next((c.candidate_id for c in pool for s, _ in spans[:1] if c.start <= s < c.end),
                   None)
      if first is None:
        skipped_questions += 1
        continue
      questions[qid] = question
      answers[qid] = relevant
      pairs.append((question, texts[first]))
  if skipped_contexts or skipped_questions:
    logging.warning("%s: skipped %d MRQA contexts without MultiReQA sentences and %d questions "
                    "whose answer is in no sentence", candidates_path, skipped_contexts,
                    skipped_questions)
  return Sentences(questions, sentences, answers, tuple(pairs))


def _candidates_split(dataset: str, split: str) -> str:
  if split == "train":
    return "train"
  return "dev" if DATASETS[dataset].in_domain else "test"


def load(dataset: str, split: str, directory: str | None = None, use_tfds: bool = False,
         append_context: bool = False) -> Sentences:
  """MultiReQA `split` ("train" or "test") of `dataset` (lowercase name); cached per process."""
  if dataset not in DATASETS:
    raise KeyError(f"Unknown MultiReQA dataset {dataset!r}; known: {sorted(DATASETS)}")
  return _load(dataset, split, directory or paths.multireqa_dir(), use_tfds, append_context)


@functools.lru_cache(maxsize=4)
def _load(dataset: str, split: str, directory: str, use_tfds: bool, append_context: bool
          ) -> Sentences:
  info = DATASETS[dataset]
  candidates_path = readers.find_file(
      os.path.join(directory, "candidates", _candidates_split(dataset, split), info.file_name),
      "candidates.json", "MultiReQA sentence boundaries", _HOW_TO_GET)
  candidates = read_candidates(candidates_path, info.file_name)
  if use_tfds:
    tfds_split = "train" if split == "train" else ("validation" if info.in_domain else "test")
    contexts = read_mrqa_tfds(info.tfds_config, tfds_split)
  else:
    mrqa_split = "train" if split == "train" else "dev"
    path = readers.find_file(os.path.join(directory, "mrqa", mrqa_split), info.file_name + ".jsonl",
                             "MRQA file", _HOW_TO_GET)
    contexts = read_mrqa_jsonl(path)
  return build_sentences(contexts, candidates, candidates_path, append_context=append_context)


def _train_pairs(dataset: str, directory: str | None, use_tfds: bool, append_context: bool):
  for question, document in load(dataset, "train", directory, use_tfds, append_context).pairs:
    yield {features.QUERIES: question, features.PASSAGES: document}


def eval_set(dataset: str, directory: str | None, use_tfds: bool, append_context: bool,
                  vocabulary: seqio.Vocabulary) -> eval_sets.EvalSet:
  data = load(dataset, "test", directory, use_tfds, append_context)
  return eval_sets.EvalSet(name=f"multireqa_{dataset}_test", queries=data.questions,
                           corpus=data.sentences, qrels=data.answers, vocabulary=vocabulary,
                           protocol="multireqa")


def register(directory: str | None = None, *, use_tfds: bool = False, append_context: bool = False,
             vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers the MultiReQA tasks, mixture and eval sets (replacing earlier registrations).

  Args:
    directory: data directory; None: `paths.multireqa_dir()` when the data is first read.
    use_tfds: read questions and contexts from TFDS mrqa/<config> instead of MRQA .jsonl.gz.
    append_context: document = answer sentence + " " + its whole context.
    vocabulary: default T5's public vocabulary.
  """
  vocabulary = vocabulary or vocab.t5_vocabulary()
  for dataset, info in DATASETS.items():
    if info.in_domain:
      source = sources.examples_source({"train": functools.partial(
          _train_pairs, dataset, directory, use_tfds, append_context)})
      beir.register_pairs_task(f"multireqa_{dataset}_train", source, vocabulary)
    loader = functools.partial(eval_set, dataset, directory, use_tfds, append_context, vocabulary)
    eval_sets.register_eval_set(f"multireqa_{dataset}_test", loader, overwrite=True)
  seqio.MixtureRegistry.remove(IN_DOMAIN_MIXTURE)
  seqio.MixtureRegistry.add(IN_DOMAIN_MIXTURE, [
      (f"multireqa_{d}_train", info.train_size) for d, info in DATASETS.items() if info.in_domain])
