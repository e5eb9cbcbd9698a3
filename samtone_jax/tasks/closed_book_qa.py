"""Closed-book question answering tasks: the model reads the question alone and writes an answer.

Examples are {"inputs": question, "targets": first gold answer, "answers": every gold answer};
"inputs"/"targets" are tokenised (EOS-terminated), "answers" stays text for exact match
(`samtone_jax.evaluation.qa_metrics`), which counts a prediction correct if it matches any of them.

Official formats read here (plain or .gz; a malformed row raises `readers.DataFormatError` with
its file and 1-based line):

  MetaQA       question with [topic entity]<TAB>answer|answer|...
               (https://github.com/yuyuz/MetaQA: {1,2,3}-hop/vanilla/qa_{train,dev,test}.txt).
               The brackets mark the topic entity; they are removed from the model input.
  FreebaseQA   one JSON document {"Dataset", "Version", "Questions": [{"Question-ID",
               "RawQuestion", "ProcessedQuestion", "Parses": [{"Parse-Id", ..., "Answers":
               [{"AnswersMid", "AnswersName": [name, ...]}]}]}]}
               (https://github.com/kelvin-jiang/FreebaseQA: FreebaseQA-{train,dev,eval}.json).
               The input is RawQuestion; the answers are every AnswersName of every parse.
  TFDS         natural_questions_open ("question", "answer": [A]) and trivia_qa/unfiltered.nocontext
               ("question", "answer": {"value", "aliases"}), read from the TFDS data dir once
               prepared (`tfds build ...`); registered without reading anything.
"""

from collections.abc import Callable, Iterator, Mapping
import functools
import json
import os
import re

import seqio
import tensorflow as tf

from samtone_jax.tasks import features
from samtone_jax.tasks import paths
from samtone_jax.tasks import preprocessors
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources

QA_SPEC = {features.INPUTS: sources.STRING, features.TARGETS: sources.STRING,
           features.ANSWERS: sources.STRING_LIST}
_ENTITY_RE = re.compile(r"\[([^\[\]]*)\]")
METAQA_HELP = ("Download MetaQA from https://github.com/yuyuz/MetaQA (the Google Drive link in its "
               "README) and unpack it; the 1-hop questions are in 1-hop/vanilla/qa_<split>.txt.")
FREEBASEQA_HELP = ("Download FreebaseQA-{train,dev,eval}.json from "
                   "https://github.com/kelvin-jiang/FreebaseQA and put them in that directory.")
TFDS_HELP = ("Prepare it with `tfds build {name}` (on a machine with network) or copy a prepared "
             "{name} into the TFDS data dir (TFDS_DATA_DIR or "
             "paths.configure_data_dirs(tfds_data_dir=...)).")


def qa_record(question: str, answers: list[str]) -> dict:
  """The source record of one QA example: the first answer is the training target."""
  return {features.INPUTS: question, features.TARGETS: answers[0], features.ANSWERS: answers}


def read_metaqa(path: str, *, keep_brackets: bool = False) -> Iterator[dict]:
  """MetaQA `question with [entity]<TAB>answer|answer` lines -> QA records, in file order.

  Args:
    path: e.g. 1-hop/vanilla/qa_train.txt.
    keep_brackets: keep "[entity]" in the question (default: "entity", as a user would ask).
  """
  for line, (question, answers) in readers.iter_tsv(path, 2):
    question = readers.check_text(path, line, "question", question)
    entities = _ENTITY_RE.findall(question)
    if len(entities) != 1 or question.count("[") != 1 or question.count("]") != 1:
      raise readers.DataFormatError(path, line, "expected exactly one [topic entity] in the "
                                    f"question, got {question[:80]!r}")
    if not entities[0].strip():
      raise readers.DataFormatError(path, line, "empty [topic entity] in the question")
    if not keep_brackets:
      question = _ENTITY_RE.sub(r"\1", question)
    names = answers.split("|")
    for name in names:
      if not name.strip():
        raise readers.DataFormatError(path, line, f"empty answer in {answers!r} (answers are "
                                      "'|'-separated)")
    yield qa_record(question, [name.strip() for name in names])


def _json_array_lines(text: str, key: str, count: int) -> list[int] | None:
  """The 1-based line where each element of the top-level array `key` starts, or None."""
  match = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
  if not match:
    return None
  decoder = json.JSONDecoder()
  lines, position = [], match.end()
  try:
    for _ in range(count):
      while text[position] in " \t\r\n,":
        position += 1
      lines.append(text.count("\n", 0, position) + 1)
      _, position = decoder.raw_decode(text, position)
  except (json.JSONDecodeError, IndexError):
    return None
  return lines


def read_freebaseqa(path: str) -> Iterator[dict]:
  """A FreebaseQA-<split>.json file -> QA records (RawQuestion; all parses' AnswersName)."""
  with readers.open_binary(path) as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise readers.DataFormatError(path, raw.count(b"\n", 0, e.start) + 1,
                                  f"invalid UTF-8 ({e.reason} at byte {e.start})")
  try:
    document = json.loads(text)
  except json.JSONDecodeError as e:
    raise readers.DataFormatError(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})")
  if not isinstance(document, dict) or not isinstance(document.get("Questions"), list):
    raise readers.DataFormatError(path, 1, 'expected a JSON object {"Dataset": ..., '
                                  '"Questions": [...]} (the FreebaseQA layout)')
  questions = document["Questions"]
  lines = _json_array_lines(text, "Questions", len(questions)) or [None] * len(questions)
  for index, (question, line) in enumerate(zip(questions, lines)):
    if not isinstance(question, dict):
      raise readers.DataFormatError(path, line, f"Questions[{index}]: expected an object, got "
                                    f"{type(question).__name__}")
    where = f"Questions[{index}] (Question-ID {question.get('Question-ID')!r})"
    raw_question = question.get("RawQuestion")
    if not isinstance(raw_question, str) or not raw_question.strip():
      raise readers.DataFormatError(path, line, f"{where}: missing or empty 'RawQuestion'")
    answers = _freebaseqa_answers(question.get("Parses"), path, line, where)
    yield qa_record(raw_question.strip(), answers)


def _freebaseqa_answers(parses, path: str, line: int | None, where: str) -> list[str]:
  """Every AnswersName of every parse, in order, each once."""
  if not isinstance(parses, list) or not parses:
    raise readers.DataFormatError(path, line, f"{where}: missing or empty 'Parses' (the answers "
                                  "are in Parses[i].Answers[j].AnswersName)")
  answers: list[str] = []
  for p, parse in enumerate(parses):
    parse_answers = parse.get("Answers") if isinstance(parse, dict) else None
    if not isinstance(parse_answers, list):
      raise readers.DataFormatError(path, line, f"{where}: Parses[{p}] has no 'Answers' list")
    for a, answer in enumerate(parse_answers):
      names = answer.get("AnswersName") if isinstance(answer, dict) else None
      if (not isinstance(names, list) or not names
          or not all(isinstance(n, str) and n.strip() for n in names)):
        raise readers.DataFormatError(
            path, line, f"{where}: Parses[{p}].Answers[{a}].AnswersName should be a non-empty "
            f"list of non-empty strings, got {names!r}")
      answers.extend(n.strip() for n in names if n.strip() not in answers)
  return answers


def answers_postprocessor(output: str, example: Mapping | None = None, is_target: bool = False):
  """seqio postprocess_fn: a target becomes the example's gold answers (a prediction stays text),
  so that the metric sees every answer, not only the first one the model was trained on."""
  if is_target and example is not None and features.ANSWERS in example:
    return [a.decode("utf-8") if isinstance(a, bytes) else str(a)
            for a in example[features.ANSWERS]]
  return output


def exact_match_metric(targets, predictions) -> dict[str, float]:
  """seqio metric_fn: {"exact_match": percent}, any gold answer counts (SQuAD normalisation)."""
  from samtone_jax.evaluation import qa_metrics  # pylint: disable=g-import-not-at-top
  return {"exact_match": 100.0 * qa_metrics.exact_match(predictions, targets)}


def register_qa_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary, *,
                     shuffle_buffer_size: int = 100_000) -> seqio.Task:
  """Registers (replacing any earlier one) a closed-book QA task over a QA-record source."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=[preprocessors.tokenize_trim_append_eos],
      output_features=preprocessors.seq2seq_output_features(vocabulary),
      postprocess_fn=answers_postprocessor, metric_fns=[exact_match_metric],
      shuffle_buffer_size=shuffle_buffer_size)


def file_source(split_paths: Mapping[str, Callable[[], str]],
                reader: Callable[[str], Iterator[dict]]) -> seqio.FunctionDataSource:
  """A QA source whose split s reads `reader(split_paths[s]())` (path found when it is built)."""
  return sources.file_records_source(split_paths, reader, QA_SPEC)


def metaqa_source(directory: str | None = None, hops: int = 1) -> seqio.FunctionDataSource:
  """MetaQA {hops}-hop/vanilla/qa_{train,dev,test}.txt (default directory: <data dir>/metaqa)."""

  def path(split):
    root = directory or os.path.join(paths.data_dir(), "metaqa")
    return readers.find_file(os.path.join(root, f"{hops}-hop", "vanilla"), f"qa_{split}.txt",
                             f"MetaQA {hops}-hop questions", METAQA_HELP)

  return file_source({s: functools.partial(path, s) for s in ("train", "dev", "test")},
                     read_metaqa)


def freebaseqa_source(directory: str | None = None) -> seqio.FunctionDataSource:
  """FreebaseQA-{train,dev,eval}.json as splits train/dev/test (default: <data dir>/freebaseqa)."""

  def path(file_split):
    root = directory or os.path.join(paths.data_dir(), "freebaseqa")
    return readers.find_file(root, f"FreebaseQA-{file_split}.json", "FreebaseQA questions",
                             FREEBASEQA_HELP)

  return file_source({"train": functools.partial(path, "train"),
                      "dev": functools.partial(path, "dev"),
                      "test": functools.partial(path, "eval")}, read_freebaseqa)


# ---- TFDS -------------------------------------------------------------------------------------

def _tfds_answers_nq(example):
  answers = example["answer"]
  return {features.INPUTS: example["question"], features.TARGETS: answers[0],
          features.ANSWERS: answers}


def _tfds_answers_trivia_qa(example):
  answer = example["answer"]
  aliases = answer["aliases"]
  # The value first (the training target), then its aliases (a superset, usually).
  return {features.INPUTS: example["question"], features.TARGETS: answer["value"],
          features.ANSWERS: tf.concat([[answer["value"]], aliases], axis=0)}


def tfds_qa_source(name: str, splits: Mapping[str, str], to_record) -> seqio.FunctionDataSource:
  """A QA source over TFDS `name` (read from `paths.tfds_data_dir()` when first used).

  Args:
    name: TFDS name with config, e.g. "trivia_qa/unfiltered.nocontext".
    splits: our split name -> the TFDS split, e.g. {"test": "validation"}.
    to_record: TFDS example -> QA record (tf ops).
  """

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # file order; shuffled downstream from the run's seed
    ds = readers.tfds_split(name, splits[split], TFDS_HELP.format(name=name))
    return ds.map(to_record, num_parallel_calls=tf.data.AUTOTUNE)

  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


NQ_OPEN_TFDS = "natural_questions_open"
TRIVIA_QA_TFDS = "trivia_qa/unfiltered.nocontext"


def nq_open_source() -> seqio.FunctionDataSource:
  """NQ-open: train, and the validation split as "test" (as in closed-book QA papers)."""
  return tfds_qa_source(NQ_OPEN_TFDS, {"train": "train", "test": "validation"}, _tfds_answers_nq)


def trivia_qa_source() -> seqio.FunctionDataSource:
  """TriviaQA unfiltered, no context: train, and validation as "test" (its test has no answers)."""
  return tfds_qa_source(TRIVIA_QA_TFDS, {"train": "train", "test": "validation"},
                        _tfds_answers_trivia_qa)
