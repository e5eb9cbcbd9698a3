"""Registered SKILL tasks: knowledge infusion over a KG, closed-book QA, and the WordNet demo.

Seq2seq tasks (features "inputs", "targets": token ids, EOS-terminated; the QA tasks also carry
the text feature "answers" and the metric "exact_match"). Registration reads no data file: files
are found when a task's dataset is built, under `paths.data_dir()` ($SAMTONE_DATA_DIR, default
~/samtone_data), and a missing one raises MissingDataError saying where to get it.

Embedded demo (WordNet 3.0, shipped in data/wordnet/, vocabulary `vocab.wordnet_vocabulary()`):
  demo_wordnet_skill            SKILL infusion on the KG's 3,001 triples (both directions), "train"
  demo_wordnet_sentences        the KELM-style fact sentences, masked the same way, "train"
  demo_wordnet_skill_sentences  mixture of the two, rate 1:1
  demo_wordnet_qa               the one-hop questions, splits "train", "dev", "test"

Knowledge graphs (T5's vocabulary with its 100 sentinels, `vocab.t5_vocabulary()`):
  skill_wikimovies      WikiMovies' KB: <data>/wikimovies/movieqa/knowledge_source/wiki_entities/
                        wiki_entities_kb.txt (numbered `N subject relation objects` lines;
                        the has_plot paragraphs are left out, as MetaQA's kb.txt leaves them)
  skill_metaqa_kb       MetaQA's WikiMovies KB: <data>/metaqa/kb.txt (`subject|relation|object`)
  skill_<name>          every TSV KG <data>/kg/<name>.tsv[.gz] (`subject<TAB>relation<TAB>object`,
                        e.g. Wikidata triples you extracted), registered when this module's
                        `register()` runs (importing samtone_jax.tasks.all)
  skill_kelm            the KELM corpus's generated sentences, every entity they spell masked:
                        <data>/kelm/kelm_generated_corpus.jsonl[.gz] (`kelm_help` says where to
                        download it); `register_sentences_task` registers another file or format
                        (e.g. TEKGEN's quadruples-train.tsv) from gin
  skill_wikidata_kelm   mixture of skill_wikidata and skill_kelm, rate 1:1, when
                        <data>/kg/wikidata.tsv[.gz] is there (SKILL's triples + KELM comparison)

Closed-book QA (T5's vocabulary):
  metaqa_{1,2,3}hop     <data>/metaqa/<k>-hop/vanilla/qa_{train,dev,test}.txt
  freebaseqa            <data>/freebaseqa/FreebaseQA-{train,dev,eval}.json (eval is split "test")
  nq_open               TFDS natural_questions_open (validation is split "test")
  trivia_qa_open        TFDS trivia_qa/unfiltered.nocontext (validation is split "test")
"""

import os

import seqio
import tensorflow as tf

from samtone_jax import errors
from samtone_jax.tasks import closed_book_qa
from samtone_jax.tasks import knowledge_graph
from samtone_jax.tasks import paths
from samtone_jax.tasks import readers
from samtone_jax.tasks import vocab

DEMO_DIR = vocab.WORDNET_DATA_DIR
DEMO_SKILL_TASK = "demo_wordnet_skill"
DEMO_SENTENCES_TASK = "demo_wordnet_sentences"
DEMO_SKILL_SENTENCES_MIXTURE = "demo_wordnet_skill_sentences"
DEMO_QA_TASK = "demo_wordnet_qa"
WIKIMOVIES_TASK = "skill_wikimovies"
METAQA_KB_TASK = "skill_metaqa_kb"
FREEBASEQA_TASK = "freebaseqa"
NQ_OPEN_TASK = "nq_open"
TRIVIA_QA_TASK = "trivia_qa_open"
METAQA_HOPS = (1, 2, 3)
WIKIMOVIES_KB = os.path.join("movieqa", "knowledge_source", "wiki_entities",
                             "wiki_entities_kb.txt")
WIKIMOVIES_HELP = ("Download WikiMovies (http://www.thespermwhale.com/jaseweston/babi/"
                   "movieqa.tar.gz) and unpack it into that directory's wikimovies/ folder "
                   "(tar xzf movieqa.tar.gz -C $SAMTONE_DATA_DIR/wikimovies).")
KELM_TASK = "skill_kelm"
WIKIDATA_KELM_MIXTURE = "skill_wikidata_kelm"
KELM_DIR = "kelm"
KELM_FILE = "kelm_generated_corpus.jsonl"
KELM_URL = ("https://storage.googleapis.com/gresearch/kelm-corpus/updated-2021/"
            "kelm_generated_corpus.jsonl")


def kelm_help(directory: str = "$SAMTONE_DATA_DIR/kelm") -> str:
  """Where to get the KELM corpus and where to put it (the README says the same)."""
  return ("Download the KELM corpus (Agarwal et al., NAACL 2021; "
          f"https://github.com/google-research-datasets/KELM-corpus): wget -P {directory} "
          f"{KELM_URL} (gzip it there if you like: {KELM_FILE}.gz is read as well).")


_DEMO_HELP = ("The WordNet demo data ships inside the package; reinstall samtone_jax "
              "(pip install -e .) or rebuild it with scripts/build_wordnet_kg.py.")


def metaqa_task(hops: int) -> str:
  return f"metaqa_{hops}hop"


def _demo_file(name: str, directory: str):
  return lambda: readers.find_file(directory, name, "WordNet demo file", _DEMO_HELP)


def register_demo(directory: str = DEMO_DIR) -> None:
  """Registers the WordNet demo tasks and mixture (replacing earlier registrations)."""
  vocabulary = vocab.wordnet_vocabulary()
  knowledge_graph.register_skill_task(DEMO_SKILL_TASK, _demo_file("kg.tsv", directory),
                                      vocabulary, kg_format="tsv", shuffle_buffer_size=10_000)
  knowledge_graph.register_fact_sentences_task(
      DEMO_SENTENCES_TASK, _demo_file("sentences.tsv", directory), vocabulary,
      shuffle_buffer_size=10_000)
  knowledge_graph.register_mixture(DEMO_SKILL_SENTENCES_MIXTURE,
                                   [(DEMO_SKILL_TASK, 1.0), (DEMO_SENTENCES_TASK, 1.0)])
  source = closed_book_qa.file_source(
      {split: _demo_file(f"qa_{split}.txt", directory) for split in ("train", "dev", "test")},
      closed_book_qa.read_metaqa)
  closed_book_qa.register_qa_task(DEMO_QA_TASK, source, vocabulary, shuffle_buffer_size=10_000)


def register_kg_directory(root: str, vocabulary: seqio.Vocabulary | None = None) -> list[str]:
  """Registers "skill_<name>" for every TSV KG `root/<name>.tsv[.gz]`; returns the names."""
  registered = []
  if not tf.io.gfile.isdir(root):
    return registered
  vocabulary = vocabulary or vocab.t5_vocabulary()
  for filename in sorted(tf.io.gfile.listdir(root)):
    for suffix in (".tsv", ".tsv.gz"):
      if filename.endswith(suffix):
        name = "skill_" + filename[:-len(suffix)].replace("-", "_").replace(".", "_")
        knowledge_graph.register_skill_task(name, os.path.join(root, filename), vocabulary)
        registered.append(name)
  return registered


def _kelm_file(directory: str) -> str:
  return readers.find_file(directory, KELM_FILE, "KELM corpus", kelm_help(directory))


def register_sentences_task(*, path: str, sentence_format: str = "kelm",
                            name: str = "skill_sentences",
                            vocabulary: seqio.Vocabulary | None = None,
                            shuffle_buffer_size: int = 100_000) -> str:
  """Registers (replacing any earlier one) a fact-sentence task over `path`; returns its name.

  For gin: `MIXTURE_OR_TASK_NAME = @skill.register_sentences_task()` with `path` and
  `sentence_format` bound (one of `knowledge_graph.SENTENCE_FORMATS`: "tsv", "kelm" for
  kelm_generated_corpus.jsonl, "tekgen" for the KELM release's quadruples-*.tsv).

  Args:
    path: the file (plain or .gz; local or gs://); a missing one raises MissingDataError.
    sentence_format: how to read it.
    name: the task name.
    vocabulary: default T5's (with its 100 sentinels).
    shuffle_buffer_size: the pipeline's shuffle buffer.
  """
  if sentence_format not in knowledge_graph.SENTENCE_FORMATS:
    raise errors.ConfigError(
        f"skill.register_sentences_task.sentence_format = {sentence_format!r}: expected one of "
        f"{', '.join(map(repr, knowledge_graph.SENTENCE_FORMATS))}.")
  how_to_get = {"kelm": kelm_help(os.path.dirname(path) or "."),
                "tekgen": ("Download the KELM release's TEKGEN files (https://github.com/"
                           "google-research-datasets/KELM-corpus: https://storage.googleapis.com/"
                           "gresearch/kelm-corpus/updated-2021/quadruples-train.tsv, "
                           "-validation.tsv, -test.tsv).")}.get(
                               sentence_format, "Check skill.register_sentences_task.path.")
  knowledge_graph.register_fact_sentences_task(
      name, lambda: readers.require_file(path, f"{sentence_format!r} fact-sentence file",
                                         how_to_get),
      vocabulary or vocab.t5_vocabulary(), sentence_format=sentence_format,
      shuffle_buffer_size=shuffle_buffer_size)
  return name


def register(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers every task of this module (the demo, the KGs and the QA sets)."""
  register_demo()
  vocabulary = vocabulary or vocab.t5_vocabulary()

  def under_data_dir(*parts, what, how_to_get):
    return lambda: readers.require_file(os.path.join(paths.data_dir(), *parts), what, how_to_get)

  knowledge_graph.register_skill_task(
      WIKIMOVIES_TASK, under_data_dir("wikimovies", WIKIMOVIES_KB, what="WikiMovies KB",
                                      how_to_get=WIKIMOVIES_HELP),
      vocabulary, kg_format="wikimovies_kb",
      drop_relations=knowledge_graph.WIKIMOVIES_UNSPLIT_RELATIONS)  # plots are not entities
  knowledge_graph.register_skill_task(
      METAQA_KB_TASK, under_data_dir("metaqa", "kb.txt", what="MetaQA KB (kb.txt)",
                                     how_to_get=closed_book_qa.METAQA_HELP),
      vocabulary, kg_format="metaqa_kb")
  for hops in METAQA_HOPS:
    closed_book_qa.register_qa_task(metaqa_task(hops), closed_book_qa.metaqa_source(hops=hops),
                                    vocabulary)
  closed_book_qa.register_qa_task(FREEBASEQA_TASK, closed_book_qa.freebaseqa_source(),
                                  vocabulary)
  closed_book_qa.register_qa_task(NQ_OPEN_TASK, closed_book_qa.nq_open_source(), vocabulary)
  closed_book_qa.register_qa_task(TRIVIA_QA_TASK, closed_book_qa.trivia_qa_source(), vocabulary)
  kg_tasks = register_kg_directory(os.path.join(paths.data_dir(), "kg"), vocabulary)
  knowledge_graph.register_fact_sentences_task(
      KELM_TASK, lambda: _kelm_file(os.path.join(paths.data_dir(), KELM_DIR)),
      vocabulary, sentence_format="kelm")
  if "skill_wikidata" in kg_tasks:
    knowledge_graph.register_mixture(WIKIDATA_KELM_MIXTURE,
                                     [("skill_wikidata", 1.0), (KELM_TASK, 1.0)])
