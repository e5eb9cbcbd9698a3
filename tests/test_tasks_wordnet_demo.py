"""The embedded WordNet SKILL demo: its files hold what the README says, its tasks give the token
ids the sentencepiece library gives, and the builder parses WordNet's real data.noun format."""

import gzip
import importlib.util
import os

import seqio
import sentencepiece as spm

import samtone_jax.tasks.all  # noqa: F401  (registers the tasks)
from samtone_jax.tasks import skill
from samtone_jax.tasks import vocab

DATA = vocab.WORDNET_DATA_DIR
SENTINEL_ID = vocab.WORDNET_VOCAB_SIZE + 100 - 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(name):
  with gzip.open(os.path.join(DATA, name), "rt", encoding="utf-8") as f:
    return f.read().splitlines()


def _questions(split):
  return [line.split("\t") for line in _lines(f"qa_{split}.txt.gz")]


def test_demo_files_match_the_readme():
  triples = [tuple(line.split("\t")) for line in _lines("kg.tsv.gz")]
  assert len(triples) == len(set(triples)) == 3001
  assert {r for _, r, _ in triples} == {"subclass_of", "has_part", "has_member", "made_from",
                                       "also_known_as"}
  splits = {split: _questions(split) for split in ("train", "dev", "test")}
  assert {k: len(v) for k, v in splits.items()} == {"train": 3558, "dev": 444, "test": 446}
  texts = [q for rows in splits.values() for q, _ in rows]
  assert len(set(texts)) == len(texts)  # split by question: no question in two splits
  # Every answer completes a KG fact about the bracketed entity (in one direction or the other).
  linked = {(s, o) for s, _, o in triples} | {(o, s) for s, _, o in triples}
  for question, answers in (row for rows in splits.values() for row in rows):
    entity = question[question.index("[") + 1:question.index("]")]
    for answer in answers.split("|"):
      assert (entity, answer) in linked, (question, answer)
  total = sum(os.path.getsize(os.path.join(DATA, f)) for f in os.listdir(DATA))
  assert total < 1_000_000
  with open(os.path.join(DATA, "COPYRIGHT.txt"), encoding="utf-8") as f:
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in f.read()


def _first(task_name, split, lengths):
  ds = seqio.get_mixture_or_task(task_name).get_dataset(lengths, split=split, shuffle=False)
  return [{k: v.numpy() for k, v in ex.items()} for ex in ds.take(2)]


def test_demo_skill_task_token_ids():
  sp = spm.SentencePieceProcessor(model_file=vocab.WORDNET_VOCAB_PATH)
  subject, relation, obj = _lines("kg.tsv.gz")[0].split("\t")
  relation = relation.replace("_", " ")
  first, second = _first(skill.DEMO_SKILL_TASK, "train", {"inputs": 64, "targets": 64})
  assert first["inputs"].tolist() == sp.encode(f"{subject} {relation}") + [SENTINEL_ID, 1]
  assert first["targets"].tolist() == [SENTINEL_ID] + sp.encode(obj) + [1]
  assert second["inputs"].tolist() == [SENTINEL_ID] + sp.encode(f"{relation} {obj}") + [1]
  assert second["targets"].tolist() == [SENTINEL_ID] + sp.encode(subject) + [1]
  assert vocab.wordnet_vocabulary().vocab_size == 2100


def test_demo_qa_task_token_ids_and_answers():
  sp = spm.SentencePieceProcessor(model_file=vocab.WORDNET_VOCAB_PATH)
  question, answers = _questions("test")[0]
  example = _first(skill.DEMO_QA_TASK, "test", {"inputs": 64, "targets": 64})[0]
  plain = question.replace("[", "").replace("]", "")
  assert example["inputs"].tolist() == sp.encode(plain) + [1]
  assert example["targets"].tolist() == sp.encode(answers.split("|")[0]) + [1]
  assert [a.decode() for a in example["answers"]] == answers.split("|")


def test_demo_mixture_mixes_triples_and_sentences():
  mixture = seqio.get_mixture_or_task(skill.DEMO_SKILL_SENTENCES_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == [skill.DEMO_SENTENCES_TASK,
                                                   skill.DEMO_SKILL_TASK]
  sentence = _lines("sentences.tsv.gz")[0].split("\t")
  example = _first(skill.DEMO_SENTENCES_TASK, "train", {"inputs": 64, "targets": 64})[0]
  vocabulary = vocab.wordnet_vocabulary()
  assert vocabulary.decode(example["inputs"].tolist()) == sentence[0].replace(
      sentence[3], "<extra_id_0>", 1)
  assert vocabulary.decode(example["targets"].tolist()) == "<extra_id_0> " + sentence[3]


def test_builder_parses_wordnet_data_noun(tmp_path):
  """Two real lines of WordNet 3.0's data.noun (glosses shortened) and its license header."""
  spec = importlib.util.spec_from_file_location(
      "build_wordnet_kg", os.path.join(REPO, "scripts", "build_wordnet_kg.py"))
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  path = tmp_path / "data.noun"
  path.write_text(
      "  1 This software and database is being provided to you, the LICENSEE, by  \n"
      "02083346 05 n 02 canine 0 canid 0 011 @ 02075296 n 0000 #m 02083038 n 0000 + 02677704 a "
      "0101 ~ 02083672 n 0000 ~ 02084071 n 0000 ~ 02114100 n 0000 ~ 02115096 n 0000 ~ 02115335 n "
      "0000 ~ 02117135 n 0000 ~ 02118333 n 0000 %p 02439929 n 0000 | any of various fissiped "
      "mammals  \n"
      "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 @ 01317541 "
      "n 0000 #m 02083863 n 0000 #m 07994941 n 0000 ~ 01322604 n 0000 ~ 02084732 n 0000 ~ "
      "02084861 n 0000 ~ 02085272 n 0000 ~ 02085374 n 0000 ~ 02087122 n 0000 ~ 02103406 n 0000 ~ "
      "02110341 n 0000 ~ 02110806 n 0000 ~ 02110958 n 0000 ~ 02111129 n 0000 ~ 02111277 n 0000 ~ "
      "02111500 n 0000 ~ 02111626 n 0000 ~ 02112497 n 0000 ~ 02112826 n 0000 ~ 02113335 n 0000 ~ "
      "02113978 n 0000 %p 02158846 n 0000 | a member of the genus Canis  \n")
  synsets = builder.read_noun_synsets(str(path))
  assert sorted(synsets) == ["02083346", "02084071"]
  lexfile, lemmas, pointers = synsets["02084071"]
  assert (lexfile, lemmas) == (5, ["dog", "domestic dog", "Canis familiaris"])
  assert len(pointers) == 23 and pointers[:3] == [("@", "02083346"), ("@", "01317541"),
                                                  ("#m", "02083863")]
  assert pointers[-1] == ("%p", "02158846")
  assert synsets["02083346"][2][2] == ("~", "02083672")  # the adjective pointer (+ ... a) is out
  # dog's facts: its hypernym canine is in the file (named), the other targets are not; the
  # alias "domestic dog" contains the name, so it is no fact to learn. canine has one fact only
  # (canid), too few to be a subject.
  builder.TARGET_TRIPLES = 1
  assert builder.build_kg(synsets) == [("dog", "subclass_of", "canine"),
                                       ("dog", "also_known_as", "Canis familiaris")]


def test_wordnet_vocabulary_tf_and_python_agree_on_all_demo_text():
  """Every text of the demo (and a few a user might type) gets the same ids from seqio's
  encode_tf, which the pipeline uses, and from the sentencepiece library."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=vocab.WORDNET_VOCAB_PATH)
  texts = [field for name in ("kg.tsv.gz", "sentences.tsv.gz", "qa_train.txt.gz",
                              "qa_dev.txt.gz", "qa_test.txt.gz")
           for line in _lines(name) for field in line.split("\t")]
  texts += ["Ｆｕｌｌｗｉｄｔｈ ｄｏｇ", "café crème", "what is [dog] a kind of?"]
  ragged = vocab.wordnet_vocabulary().encode_tf(tf.constant(texts))
  assert ragged.to_list() == [sp.encode(t) for t in texts]
