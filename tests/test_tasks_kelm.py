"""The KELM corpus reader: the release's JSON Lines (kelm_generated_corpus.jsonl, TEKGEN's
quadruples-*.tsv), every entity the sentence spells masked as one sentinel span, against
hand-written masked inputs/targets (token ids via sentencepiece); skip counts; file/line errors.

The fixture follows the release's README (google-research-datasets/KELM-corpus, "updated-2021"):
one JSON object per line with "triples" (lists of 3 strings, or 4 for a quadruple),
"serialized_triples" and "gen_sentence" (TEKGEN: "sentence"); ~0.1% of lines lack "triples".
"""

import os
import re

import pytest
import seqio

from fixtures import tasks_data
from samtone_jax import errors
from samtone_jax.tasks import knowledge_graph as kg
from samtone_jax.tasks import readers
from samtone_jax.tasks import vocab

SENTINEL_ID = vocab.DEMO_VOCAB_SIZE + 100 - 1
EOS = 1

KELM_LINES = (
    # 1. Two triples of one subject: three entities, all spelled.
    '{"triples": [["Kismet", "director", "William Dieterle"], ["Kismet", "publication date", '
    '"1944"]], "serialized_triples": "Kismet director William Dieterle, publication date 1944", '
    '"gen_sentence": "Kismet is a 1944 film directed by William Dieterle."}\n',
    # 2. A triple and its quadruple (sub-property "point in time"); a 2-byte UTF-8 character
    #    before the spans (JSON-escaped, as json.dumps writes it).
    '{"triples": [["Am\\u00e9lie Mauresmo", "award received", "Legion of Honour"], '
    '["Am\\u00e9lie Mauresmo", "Legion of Honour", "point in time", "2006"]], '
    '"serialized_triples": "Am\\u00e9lie Mauresmo award received Legion of Honour point in time '
    '2006", "gen_sentence": "Am\\u00e9lie Mauresmo received the Legion of Honour in 2006."}\n',
    # 3. No "triples" (as ~0.1% of the release): skipped, counted.
    '{"serialized_triples": "Kismet", "gen_sentence": "Kismet is a film."}\n',
    # 4. The generator paraphrased both entities: nothing to mask, skipped, counted.
    '{"triples": [["Marlene Dietrich", "date of birth", "27 December 1901"]], '
    '"serialized_triples": "Marlene Dietrich date of birth 27 December 1901", '
    '"gen_sentence": "Dietrich was born on December 27, 1901."}\n',
    "\n",  # a blank line is not a line of data
    # 5. "walrus" inside "walrus mustache": the later, separate occurrence is masked.
    '{"triples": [["walrus mustache", "named after", "walrus"]], "serialized_triples": '
    '"walrus mustache named after walrus", "gen_sentence": "The walrus mustache is named after '
    'the walrus."}\n',
    # 6. ... and where it only occurs inside the longer entity, it is not masked (counted).
    '{"triples": [["walrus mustache", "subclass of", "walrus"]], "serialized_triples": '
    '"walrus mustache subclass of walrus", "gen_sentence": "The walrus mustache is a style of '
    'facial hair."}\n',
)

# Hand-written: one example per masked entity, left to right in each sentence.
EXPECTED = [
    ("<extra_id_0> is a 1944 film directed by William Dieterle.", "<extra_id_0> Kismet"),
    ("Kismet is a <extra_id_0> film directed by William Dieterle.", "<extra_id_0> 1944"),
    ("Kismet is a 1944 film directed by <extra_id_0>.", "<extra_id_0> William Dieterle"),
    ("<extra_id_0> received the Legion of Honour in 2006.", "<extra_id_0> Amélie Mauresmo"),
    ("Amélie Mauresmo received the <extra_id_0> in 2006.", "<extra_id_0> Legion of Honour"),
    ("Amélie Mauresmo received the Legion of Honour in <extra_id_0>.", "<extra_id_0> 2006"),
    ("The <extra_id_0> is named after the walrus.", "<extra_id_0> walrus mustache"),
    ("The walrus mustache is named after the <extra_id_0>.", "<extra_id_0> walrus"),
    ("The <extra_id_0> is a style of facial hair.", "<extra_id_0> walrus mustache"),
]


def _write(tmp_path, name, text, gz=False):
  return tasks_data.write_text(os.path.join(tmp_path, name), text, gz=gz)


def _vocabulary():
  return seqio.SentencePieceVocabulary(vocab.DEMO_VOCAB_PATH, extra_ids=100)


def _masked_texts(task):
  masked = kg.skill_mask_sentence(task.source.get_dataset("train", shuffle=False))
  return [(ex["inputs"].numpy().decode(), ex["targets"].numpy().decode()) for ex in masked]


@pytest.mark.parametrize("gz", [False, True])
def test_kelm_task_masks_every_spelled_entity(tmp_path, gz):
  path = _write(tmp_path, "kelm_generated_corpus.jsonl", "".join(KELM_LINES), gz=gz)
  task = kg.register_fact_sentences_task("test_kelm", path, _vocabulary(),
                                         sentence_format="kelm")
  # The demo vocabulary has no "é": compare the masked texts before tokenising, then the ids of
  # the ASCII examples.
  assert _masked_texts(task) == EXPECTED
  examples = [{k: v.numpy().tolist() for k, v in ex.items()} for ex in
              task.get_dataset({"inputs": 32, "targets": 16}, split="train", shuffle=False)]
  assert len(examples) == len(EXPECTED)
  sp = tasks_data.sp_processor()
  enc = sp.encode
  assert examples[0]["inputs"] == [SENTINEL_ID] + enc(
      "is a 1944 film directed by William Dieterle.") + [EOS]
  assert examples[0]["targets"] == [SENTINEL_ID] + enc("Kismet") + [EOS]
  # The "." right after the sentinel is the piece "." (no word-start "▁": no space before it).
  assert examples[2]["inputs"] == enc("Kismet is a 1944 film directed by") + [
      SENTINEL_ID, sp.piece_to_id("."), EOS]
  assert examples[2]["targets"] == [SENTINEL_ID] + enc("William Dieterle") + [EOS]


def test_kelm_counts_what_it_skips(tmp_path):
  path = _write(tmp_path, "kelm_generated_corpus.jsonl", "".join(KELM_LINES))
  counts = kg.KelmCounts()
  read = list(kg.read_kelm_sentences(path, "kelm", counts))
  assert [sentence for sentence, _ in read] == [
      "Kismet is a 1944 film directed by William Dieterle.",
      "Amélie Mauresmo received the Legion of Honour in 2006.",
      "The walrus mustache is named after the walrus.",
      "The walrus mustache is a style of facial hair."]
  # Byte spans: "Legion of Honour" starts after "Amélie Mauresmo received the " (30 bytes, é is 2).
  assert read[1][1] == ((0, 16), (30, 46), (50, 54))
  assert counts == kg.KelmCounts(lines=6, lines_without_triples=1, entities=12,
                                 entities_not_in_sentence=2, entities_overlapping=1,
                                 lines_without_masked_entity=1, examples=9)


def test_tekgen_reads_the_sentence_field(tmp_path):
  line = ('{"triples": [["Kismet", "director", "William Dieterle"]], "serialized_triples": '
          '"Kismet director William Dieterle", "sentence": "Kismet was directed by William '
          'Dieterle."}\n')
  path = _write(tmp_path, "quadruples-train.tsv", line)
  task = kg.register_fact_sentences_task("test_tekgen", path, _vocabulary(),
                                         sentence_format="tekgen")
  assert _masked_texts(task) == [
      ("<extra_id_0> was directed by William Dieterle.", "<extra_id_0> Kismet"),
      ("Kismet was directed by <extra_id_0>.", "<extra_id_0> William Dieterle")]
  with pytest.raises(readers.DataFormatError, match=re.escape(
      f"{path}, line 1: missing field 'gen_sentence'")):
    list(kg.read_kelm_sentences(path, "kelm"))


GOOD = KELM_LINES[0]


@pytest.mark.parametrize("bad_line, problem", [
    ('{"triples": [["Kismet", "director", "William Dieterle"]], "gen_sentence": "Kismet',
     "invalid JSON"),
    ('[["Kismet", "director", "William Dieterle"]]\n', "expected a JSON object, got list"),
    ('{"triples": [["Kismet", "director", "William Dieterle"]]}\n',
     "missing field 'gen_sentence'"),
    ('{"triples": [["Kismet", "director", "William Dieterle"]], "gen_sentence": 3}\n',
     "field 'gen_sentence' should be str, got int"),
    ('{"triples": [["Kismet", "director", "William Dieterle"]], "gen_sentence": " "}\n',
     "empty text in field 'gen_sentence'"),
    ('{"triples": "Kismet director William Dieterle", "gen_sentence": "Kismet."}\n',
     "field 'triples' should be a list of triples, got str"),
    ('{"triples": [["Kismet", "director"]], "gen_sentence": "Kismet."}\n',
     "triples[0] should be a list of 3 strings (subject, relation, object) or 4"),
    ('{"triples": [["Kismet", "director", 1944]], "gen_sentence": "Kismet."}\n',
     "triples[0] should be a list of 3 strings"),
    ('{"triples": [["Kismet", "director", "x"], ["", "director", "x"]], "gen_sentence": "K."}\n',
     "empty text in field 'triples[1]'"),
])
def test_malformed_kelm_lines_name_file_and_line(tmp_path, bad_line, problem):
  path = _write(tmp_path, "kelm_generated_corpus.jsonl", GOOD + "\n" + bad_line)
  with pytest.raises(readers.DataFormatError, match=re.escape(f"{path}, line 3: {problem}")):
    list(kg.read_kelm_sentences(path, "kelm"))


def test_a_file_with_nothing_to_mask_is_an_error(tmp_path):
  path = _write(tmp_path, "kelm_generated_corpus.jsonl", KELM_LINES[2] + KELM_LINES[3])
  with pytest.raises(readers.DataFormatError, match=re.escape(
      f"{path}: no line has a 'gen_sentence' that spells one of its triples' entities (read 2 "
      "lines, 1 without 'triples')")):
    list(kg.read_kelm_sentences(path, "kelm"))
  with pytest.raises(ValueError, match="Unknown fact-sentence format 'kelm2'"):
    kg.register_fact_sentences_task("test_kelm_bad", path, _vocabulary(), sentence_format="kelm2")


def test_registered_kelm_task_and_wikidata_mixture(tmp_path):
  """skill_kelm reads <data>/kelm/kelm_generated_corpus.jsonl[.gz]; a missing file says where to
  download it (the README's words); with <data>/kg/wikidata.tsv the triples+KELM mixture exists;
  `register_sentences_task` (gin) registers another file and format."""
  from samtone_jax.tasks import paths  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import skill  # pylint: disable=g-import-not-at-top
  vocabulary = _vocabulary()
  _write(tmp_path, os.path.join("kg", "wikidata.tsv"), "Kismet\tdirector\tWilliam Dieterle\n")
  paths.configure_data_dirs(data_dir=str(tmp_path))
  try:
    skill.register(vocabulary)
    lengths = {"inputs": 32, "targets": 16}
    expected_path = str(tmp_path / "kelm" / "kelm_generated_corpus.jsonl")
    with pytest.raises(readers.MissingDataError, match=re.escape(
        "Missing KELM corpus (kelm_generated_corpus.jsonl or kelm_generated_corpus.jsonl.gz): "
        f"expected at {expected_path}. Download the KELM corpus") + ".*" + re.escape(
            f"wget -P {tmp_path / 'kelm'} https://storage.googleapis.com/gresearch/"
            "kelm-corpus/updated-2021/kelm_generated_corpus.jsonl")):
      seqio.get_mixture_or_task(skill.KELM_TASK).get_dataset(lengths, split="train",
                                                             shuffle=False)
    _write(tmp_path, os.path.join("kelm", "kelm_generated_corpus.jsonl"), "".join(KELM_LINES),
           gz=True)
    assert len(list(seqio.get_mixture_or_task(skill.KELM_TASK).get_dataset(
        lengths, split="train", shuffle=False))) == len(EXPECTED)
    mixture = seqio.get_mixture_or_task(skill.WIKIDATA_KELM_MIXTURE)
    assert sorted(t.name for t in mixture.tasks) == ["skill_kelm", "skill_wikidata"]
    tekgen = _write(tmp_path, "quadruples-train.tsv", KELM_LINES[0].replace(
        '"gen_sentence"', '"sentence"'))
    name = skill.register_sentences_task(path=tekgen, sentence_format="tekgen",
                                         name="test_tekgen_gin", vocabulary=vocabulary)
    assert _masked_texts(seqio.get_mixture_or_task(name)) == EXPECTED[:3]
    missing = str(tmp_path / "none" / "quadruples-train.tsv")
    skill.register_sentences_task(path=missing, sentence_format="tekgen", name="test_tekgen_gone",
                                  vocabulary=vocabulary)
    with pytest.raises(readers.MissingDataError, match=re.escape(
        f"Missing 'tekgen' fact-sentence file: expected at {missing}. Download the KELM "
        "release's TEKGEN files")):
      seqio.get_mixture_or_task("test_tekgen_gone").source.get_dataset("train")
    with pytest.raises(errors.ConfigError, match=re.escape(
        "skill.register_sentences_task.sentence_format = 'jsonl': expected one of 'tsv', "
        "'kelm', 'tekgen'.")):
      skill.register_sentences_task(path=tekgen, sentence_format="jsonl")
  finally:
    paths.reset_data_dirs()


def test_gin_selects_the_file_and_format(tmp_path):
  """The bindings gin/experiments/skill_wikidata_freebaseqa.gin documents for another KELM file."""
  import gin  # pylint: disable=g-import-not-at-top
  from samtone_jax import gin_config  # pylint: disable=g-import-not-at-top
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  tekgen = _write(tmp_path, "quadruples-train.tsv", KELM_LINES[0].replace(
      '"gen_sentence"', '"sentence"'))
  gin.clear_config()
  try:
    gin_config.parse_gin(
        ["experiments/skill_wikidata_freebaseqa.gin"],
        ['MODEL_DIR = "/unused"', "MIXTURE_OR_TASK_NAME = @skill.register_sentences_task()",
         f'skill.register_sentences_task.path = "{tekgen}"',
         'skill.register_sentences_task.sentence_format = "tekgen"'], [])
    data = gin_config.call_configured(trainer.DataConfig)
  finally:
    gin.clear_config()
  assert data.mixture_or_task_name == "skill_sentences"
  assert _masked_texts(seqio.get_mixture_or_task("skill_sentences")) == EXPECTED[:3]
