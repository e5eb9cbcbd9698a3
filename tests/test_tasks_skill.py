"""SKILL knowledge-graph data: triple readers (TSV, MetaQA kb.txt, WikiMovies KB), the masking
preprocessor against hand-written inputs/targets, and file/line errors on malformed rows.

Expected token ids come from the sentencepiece library directly; the sentinel <extra_id_0> of a
vocabulary with 100 extra ids is its last id, 8000 + 100 - 1 (seqio's convention, which T5
follows: extra id i is vocab_size - 1 - i).
"""

import os
import re

import pytest
import seqio

from fixtures import tasks_data
from samtone_jax.tasks import knowledge_graph as kg
from samtone_jax.tasks import readers
from samtone_jax.tasks import vocab

SENTINEL_ID = vocab.DEMO_VOCAB_SIZE + 100 - 1
EOS = 1

# The first movie of WikiMovies' movieqa/knowledge_source/wiki_entities/wiki_entities_kb.txt,
# abridged (plot shortened), and the start of the next one: numbered lines, blank line between.
WIKIMOVIES_KB = (
    "1 Kismet directed_by William Dieterle\n"
    "2 Kismet written_by Edward Knoblock\n"
    "3 Kismet starred_actors Marlene Dietrich, Edward Arnold\n"
    "4 Kismet release_year 1944\n"
    "5 Kismet has_plot Hafiz, a rascally beggar, schemes.\n"
    "\n"
    "1 Flags of Our Fathers directed_by Clint Eastwood\n")
# MetaQA's kb.txt (its WikiMovies KB, one object per line).
METAQA_KB = ("Kismet|directed_by|William Dieterle\n"
             "Kismet|starred_actors|Marlene Dietrich\n")


def _write(tmp_path, name, text):
  path = os.path.join(tmp_path, name)
  tasks_data.write_bytes(path, text.encode("utf-8"))
  return path


def _triples(path, kg_format):
  return [(t.subject, t.relation, t.object) for t in kg.read_triples(path, kg_format)]


def test_wikimovies_kb_reader(tmp_path):
  path = _write(tmp_path, "wiki_entities_kb.txt", WIKIMOVIES_KB)
  assert _triples(path, "wikimovies_kb") == [
      ("Kismet", "directed_by", "William Dieterle"),
      ("Kismet", "written_by", "Edward Knoblock"),
      ("Kismet", "starred_actors", "Marlene Dietrich"),
      ("Kismet", "starred_actors", "Edward Arnold"),
      ("Kismet", "release_year", "1944"),
      ("Kismet", "has_plot", "Hafiz, a rascally beggar, schemes."),  # a plot is not a list
      ("Flags of Our Fathers", "directed_by", "Clint Eastwood"),
  ]


def test_metaqa_kb_and_tsv_readers(tmp_path):
  metaqa = _write(tmp_path, "kb.txt", METAQA_KB)
  tsv = _write(tmp_path, "kg.tsv", METAQA_KB.replace("|", "\t"))
  expected = [("Kismet", "directed_by", "William Dieterle"),
              ("Kismet", "starred_actors", "Marlene Dietrich")]
  assert _triples(metaqa, "metaqa_kb") == expected
  assert _triples(tsv, "tsv") == expected


@pytest.mark.parametrize("kg_format,text,line,problem", [
    ("tsv", "a\tb\tc\na\tb\n", 2, "expected 3 tab-separated columns, got 2"),
    ("tsv", "a\t \tc\n", 1, "empty text in field 'relation'"),
    ("metaqa_kb", "a|b|c\na|b|c|d\n", 2, "expected 'subject|relation|object' (3 '|'-separated "
     "fields), got 4"),
    ("metaqa_kb", "a|b|c\n\n", 2, "expected 'subject|relation|object'"),
    ("wikimovies_kb", "1 Kismet directed_by X\nKismet written_by Y\n", 2,
     "expected 'N subject relation object'"),
    ("wikimovies_kb", "1 Kismet directed_by X\n3 Kismet written_by Y\n", 2,
     "line number 3 should be 2"),
    ("wikimovies_kb", "1 Kismet liked_by X\n", 1, "expected 'N subject relation object'"),
])
def test_malformed_kg_rows_name_file_and_line(tmp_path, kg_format, text, line, problem):
  path = _write(tmp_path, "kg.txt", text)
  with pytest.raises(readers.DataFormatError, match=re.escape(f"{path}, line {line}: {problem}")):
    list(kg.read_triples(path, kg_format))


def _examples(task, lengths):
  return [{k: v.numpy().tolist() for k, v in ex.items()}
          for ex in task.get_dataset(lengths, split="train", shuffle=False)]


def test_skill_task_inputs_and_targets(tmp_path):
  path = _write(tmp_path, "kb.txt", METAQA_KB)
  vocabulary = seqio.SentencePieceVocabulary(vocab.DEMO_VOCAB_PATH, extra_ids=100)
  task = kg.register_skill_task("test_skill_fixture", path, vocabulary, kg_format="metaqa_kb")
  sp = tasks_data.sp_processor()
  enc = sp.encode
  # Hand-written: object masked, then subject masked, per triple; underscores become spaces.
  expected = [
      ("Kismet directed by <extra_id_0>", "<extra_id_0> William Dieterle",
       enc("Kismet directed by") + [SENTINEL_ID], [SENTINEL_ID] + enc("William Dieterle")),
      ("<extra_id_0> directed by William Dieterle", "<extra_id_0> Kismet",
       [SENTINEL_ID] + enc("directed by William Dieterle"), [SENTINEL_ID] + enc("Kismet")),
      ("Kismet starred actors <extra_id_0>", "<extra_id_0> Marlene Dietrich",
       enc("Kismet starred actors") + [SENTINEL_ID], [SENTINEL_ID] + enc("Marlene Dietrich")),
      ("<extra_id_0> starred actors Marlene Dietrich", "<extra_id_0> Kismet",
       [SENTINEL_ID] + enc("starred actors Marlene Dietrich"), [SENTINEL_ID] + enc("Kismet")),
  ]
  examples = _examples(task, {"inputs": 32, "targets": 32})
  assert len(examples) == len(expected)
  for example, (inputs_text, targets_text, inputs_ids, targets_ids) in zip(examples, expected):
    assert example["inputs"] == inputs_ids + [EOS]
    assert example["targets"] == targets_ids + [EOS]
    assert vocabulary.decode(example["inputs"]) == inputs_text
    assert vocabulary.decode(example["targets"]) == targets_text
  # Trimming keeps EOS: the first example cut to 3 input and 2 target tokens.
  short = _examples(task, {"inputs": 3, "targets": 2})[0]
  assert short["inputs"] == enc("Kismet directed by")[:2] + [EOS]
  assert short["targets"] == [SENTINEL_ID, EOS]


def test_fact_sentences_task(tmp_path):
  path = _write(tmp_path, "sentences.tsv",
                "Kismet (1944) was directed by William Dieterle.\tKismet\tdirected_by\t"
                "William Dieterle\n"
                "In 2001 Jean-Pierre Jeunet directed Amélie.\tAmélie\tdirected_by\t"
                "Jean-Pierre Jeunet\n")  # spans are byte offsets: after a 2-byte character
  vocabulary = seqio.SentencePieceVocabulary(vocab.DEMO_VOCAB_PATH, extra_ids=100)
  task = kg.register_fact_sentences_task("test_skill_sentences", path, vocabulary)
  # The masked texts (the demo vocabulary has no "é", so compare before tokenising).
  masked = kg.skill_mask_sentence(task.source.get_dataset("train", shuffle=False))
  decoded = [(ex["inputs"].numpy().decode(), ex["targets"].numpy().decode()) for ex in masked]
  assert decoded == [
      ("Kismet (1944) was directed by <extra_id_0>.", "<extra_id_0> William Dieterle"),
      ("<extra_id_0> (1944) was directed by William Dieterle.", "<extra_id_0> Kismet"),
      ("In 2001 <extra_id_0> directed Amélie.", "<extra_id_0> Jean-Pierre Jeunet"),
      ("In 2001 Jean-Pierre Jeunet directed <extra_id_0>.", "<extra_id_0> Amélie")]


def test_entity_spans_do_not_overlap():
  sentence = "walrus mustache is also called walrus."
  assert kg.entity_spans(sentence, "walrus mustache", "walrus") == ((0, 15), (31, 37))
  assert kg.entity_spans("Amélie by Jeunet", "Amélie", "Jeunet") == ((0, 7), (11, 17))
  assert kg.entity_spans("walrus mustache", "walrus mustache", "walrus") is None


def test_fact_sentence_must_state_the_fact(tmp_path):
  path = _write(tmp_path, "sentences.tsv", "Kismet is a film.\tKismet\tdirected_by\tDieterle\n")
  with pytest.raises(readers.DataFormatError, match=re.escape(
      f"{path}, line 1: the object 'Dieterle' does not occur in the sentence")):
    list(kg.read_fact_sentences(path))


def test_skill_needs_a_vocabulary_with_sentinels(tmp_path):
  with pytest.raises(ValueError, match="needs extra ids"):
    kg.register_skill_task("test_skill_no_sentinel", "kg.tsv", vocab.demo_vocabulary())


def test_registered_kg_tasks_read_the_data_dir(tmp_path):
  """skill_wikimovies / skill_<name> find their files under the data dir configured at use."""
  from samtone_jax.tasks import paths  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import skill  # pylint: disable=g-import-not-at-top
  vocabulary = seqio.SentencePieceVocabulary(vocab.DEMO_VOCAB_PATH, extra_ids=100)
  _write(tmp_path, os.path.join("kg", "my-kg.tsv"), METAQA_KB.replace("|", "\t"))
  paths.configure_data_dirs(data_dir=str(tmp_path))
  try:
    skill.register(vocabulary)
    assert skill.register_kg_directory(str(tmp_path / "kg"), vocabulary) == ["skill_my_kg"]
    with pytest.raises(readers.MissingDataError, match=re.escape(
        str(tmp_path / "wikimovies" / skill.WIKIMOVIES_KB)) + ".*movieqa.tar.gz"):
      seqio.get_mixture_or_task(skill.WIKIMOVIES_TASK).get_dataset(
          {"inputs": 8, "targets": 8}, split="train", shuffle=False)
    _write(tmp_path, os.path.join("wikimovies", skill.WIKIMOVIES_KB), WIKIMOVIES_KB)
    for name, count in ((skill.WIKIMOVIES_TASK, 12), ("skill_my_kg", 4)):
      ds = seqio.get_mixture_or_task(name).get_dataset({"inputs": 32, "targets": 32},
                                                       split="train", shuffle=False)
      examples = list(ds)
      assert len(examples) == count  # WikiMovies: 7 triples, less the plot, 2 examples each
      assert vocabulary.decode(examples[0]["inputs"].numpy().tolist()) == (
          "Kismet directed by <extra_id_0>")
  finally:
    paths.reset_data_dirs()
