"""Closed-book QA readers (MetaQA, FreebaseQA, TFDS): records, token ids, file/line errors."""

import json
import os
import re

import pytest
import tensorflow_datasets as tfds

from fixtures import tasks_data
from samtone_jax.tasks import closed_book_qa as qa
from samtone_jax.tasks import paths
from samtone_jax.tasks import readers
from samtone_jax.tasks import vocab

# MetaQA 1-hop/vanilla/qa_train.txt lines (official layout).
METAQA = ("what movies are about [ginger rogers]\tTop Hat|Kitty Foyle|The Barkleys of Broadway\n"
          "who directed the movie [Kismet]\tWilliam Dieterle\n")

# FreebaseQA-train.json in the layout its README documents (github.com/kelvin-jiang/FreebaseQA):
# two questions; the second has two parses.
FREEBASEQA = {
    "Dataset": "FreebaseQA-train",
    "Version": "1.0",
    "Questions": [
        {"Question-ID": "FreebaseQA-train-0",
         "RawQuestion": "What was Pierce Brosnan's first outing as 007?",
         "ProcessedQuestion": "what was pierce brosnan's first outing as 007",
         "Parses": [{"Parse-Id": "FreebaseQA-train-0.P0",
                     "PotentialTopicEntityMention": "007",
                     "TopicEntityName": "james bond",
                     "TopicEntityMid": "m.0clpml",
                     "InferentialChain":
                         "film.film_character.portrayed_in_films..film.performance.film",
                     "Answers": [{"AnswersMid": "m.01npcx", "AnswersName": ["goldeneye"]}]}]},
        {"Question-ID": "FreebaseQA-train-1",
         "RawQuestion": "Which city hosted the 1900 Summer Olympics?",
         "ProcessedQuestion": "which city hosted the 1900 summer olympics",
         "Parses": [{"Parse-Id": "FreebaseQA-train-1.P0",
                     "Answers": [{"AnswersMid": "m.05qtj", "AnswersName": ["paris"]}]},
                    {"Parse-Id": "FreebaseQA-train-1.P1",
                     "Answers": [{"AnswersMid": "m.05qtj", "AnswersName": ["paris",
                                                                          "city of light"]}]}]},
    ]}


def _write(tmp_path, name, text):
  return tasks_data.write_bytes(os.path.join(tmp_path, name), text.encode("utf-8"))


def _message(path, line, problem):
  return re.escape(f"{path}, line {line}: {problem}")


def test_metaqa_reader(tmp_path):
  path = _write(tmp_path, "qa_train.txt", METAQA)
  assert list(qa.read_metaqa(path)) == [
      {"inputs": "what movies are about ginger rogers", "targets": "Top Hat",
       "answers": ["Top Hat", "Kitty Foyle", "The Barkleys of Broadway"]},
      {"inputs": "who directed the movie Kismet", "targets": "William Dieterle",
       "answers": ["William Dieterle"]}]
  assert next(qa.read_metaqa(path, keep_brackets=True))["inputs"] == (
      "what movies are about [ginger rogers]")


@pytest.mark.parametrize("text,line,problem", [
    ("who directed [Kismet]\tA\nwho directed [Kismet]\n", 2, "expected 2 tab-separated columns"),
    ("who directed Kismet\tA\n", 1, "expected exactly one [topic entity] in the question"),
    ("who directed [Kismet] and [Heat]\tA\n", 1, "expected exactly one [topic entity]"),
    ("who directed [Kismet]\tA||B\n", 1, "empty answer in 'A||B'"),
    ("who directed [Kismet]\t\n", 1, "empty answer"),
])
def test_metaqa_malformed_rows(tmp_path, text, line, problem):
  path = _write(tmp_path, "qa_dev.txt", text)
  with pytest.raises(readers.DataFormatError, match=_message(path, line, problem)):
    list(qa.read_metaqa(path))


def test_freebaseqa_reader(tmp_path):
  path = _write(tmp_path, "FreebaseQA-train.json", json.dumps(FREEBASEQA, indent=2))
  assert list(qa.read_freebaseqa(path)) == [
      {"inputs": "What was Pierce Brosnan's first outing as 007?", "targets": "goldeneye",
       "answers": ["goldeneye"]},
      {"inputs": "Which city hosted the 1900 Summer Olympics?", "targets": "paris",
       "answers": ["paris", "city of light"]}]  # every parse's names, once each


def _broken_freebaseqa(tmp_path, mutate):
  document = json.loads(json.dumps(FREEBASEQA))
  mutate(document["Questions"][1])
  text = json.dumps(document, indent=2)
  # The line of the broken question's opening brace, found independently of the reader.
  line = text.splitlines().index("    {", text.splitlines().index('  "Questions": [') + 2) + 1
  return _write(tmp_path, "FreebaseQA-dev.json", text), line


@pytest.mark.parametrize("mutate,problem", [
    (lambda q: q.pop("RawQuestion"), "missing or empty 'RawQuestion'"),
    (lambda q: q.update(Parses=[]), "missing or empty 'Parses'"),
    (lambda q: q["Parses"][1].pop("Answers"), "Parses[1] has no 'Answers' list"),
    (lambda q: q["Parses"][0]["Answers"][0].update(AnswersName=[]),
     "Parses[0].Answers[0].AnswersName should be a non-empty list"),
])
def test_freebaseqa_malformed_question(tmp_path, mutate, problem):
  path, line = _broken_freebaseqa(tmp_path, mutate)
  with pytest.raises(readers.DataFormatError, match=_message(
      path, line, "Questions[1] (Question-ID 'FreebaseQA-train-1'): " + problem)):
    list(qa.read_freebaseqa(path))


def test_freebaseqa_invalid_json_and_layout(tmp_path):
  path = _write(tmp_path, "FreebaseQA-eval.json", '{"Questions": [\n{"RawQuestion": "x",}\n]}')
  with pytest.raises(readers.DataFormatError, match=_message(path, 2, "invalid JSON")):
    list(qa.read_freebaseqa(path))
  path = _write(tmp_path, "FreebaseQA-eval.json", '[{"RawQuestion": "x"}]')
  with pytest.raises(readers.DataFormatError, match=_message(path, 1, "expected a JSON object")):
    list(qa.read_freebaseqa(path))


def test_qa_task_token_ids_answers_and_metric(tmp_path):
  _write(tmp_path, os.path.join("1-hop", "vanilla", "qa_test.txt"), METAQA)
  vocabulary = vocab.demo_vocabulary()
  task = qa.register_qa_task("test_metaqa_fixture", qa.metaqa_source(str(tmp_path)), vocabulary)
  sp = tasks_data.sp_processor()
  examples = list(task.get_dataset({"inputs": 16, "targets": 4}, split="test", shuffle=False))
  assert [ex["inputs"].numpy().tolist() for ex in examples] == [
      sp.encode("what movies are about ginger rogers")[:15] + [1],
      sp.encode("who directed the movie Kismet")[:15] + [1]]
  assert [ex["targets"].numpy().tolist() for ex in examples] == [
      sp.encode("Top Hat")[:3] + [1], sp.encode("William Dieterle")[:3] + [1]]
  answers = [[a.decode() for a in ex["answers"].numpy()] for ex in examples]
  assert answers == [["Top Hat", "Kitty Foyle", "The Barkleys of Broadway"], ["William Dieterle"]]
  # seqio's evaluator: targets become every gold answer; exact match counts any of them.
  example = {k: v.numpy() for k, v in examples[0].items()}
  targets = [task.postprocess_fn("Top Hat", example=example, is_target=True)]
  assert targets == [answers[0]]
  assert task.metric_fns[0](targets, ["the barkleys of broadway!"]) == {"exact_match": 100.0}
  assert task.metric_fns[0](targets, ["Swing Time"]) == {"exact_match": 0.0}


def test_metaqa_missing_files_say_where_to_get_them(tmp_path):
  source = qa.metaqa_source(str(tmp_path))
  with pytest.raises(readers.MissingDataError, match=re.escape(
      os.path.join(str(tmp_path), "1-hop", "vanilla", "qa_train.txt")) + ".*yuyuz/MetaQA"):
    source.get_dataset("train")


@pytest.mark.parametrize("source_fn,name", [
    (qa.nq_open_source, "natural_questions_open"),
    (qa.trivia_qa_source, "trivia_qa/unfiltered.nocontext")])
def test_tfds_qa_unprepared_says_how_to_get_it(tmp_path, source_fn, name):
  paths.configure_data_dirs(tfds_data_dir=str(tmp_path / "tfds"))
  try:
    with pytest.raises(readers.MissingDataError, match=re.escape(
        f"Missing TFDS dataset {name} (split 'validation'): expected at "
        f"{tmp_path / 'tfds' / name}/") + r"[0-9.]+\. " + re.escape(
            f"Prepare it with `tfds build {name}`")):
      source_fn().get_dataset("test")
  finally:
    paths.reset_data_dirs()


def test_nq_open_records_from_tfds(tmp_path):
  """The real TFDS reading path, on data TFDS's mock_data generates for the builder's features."""
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = list(tfds.as_numpy(tfds.load(qa.NQ_OPEN_TFDS, split="validation")))
    records = list(tfds.as_numpy(qa.nq_open_source().get_dataset("test")))
  assert len(records) == 3
  for example, record in zip(raw, records):
    assert record["inputs"] == example["question"]
    assert list(record["answers"]) == list(example["answer"])
    assert record["targets"] == example["answer"][0]


def test_trivia_qa_records_from_tfds():
  """TriviaQA: the value is the target; answers are the value, then its aliases."""
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = list(tfds.as_numpy(tfds.load(qa.TRIVIA_QA_TFDS, split="validation")))
    records = list(tfds.as_numpy(qa.trivia_qa_source().get_dataset("test")))
  assert len(records) == 3
  for example, record in zip(raw, records):
    assert record["inputs"] == example["question"]
    assert record["targets"] == example["answer"]["value"]
    assert list(record["answers"]) == [example["answer"]["value"]] + list(
        example["answer"]["aliases"])
