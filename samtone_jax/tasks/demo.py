"""The embedded demo dataset: Debian man pages (shipped in `data/manpages/`, BEIR layout).

Query: a page's one-line NAME summary ("copy or catenate a string"); document: the first 300
words of its DESCRIPTION. ~2,600 pages from manpages, manpages-dev, git-man, libssl-doc and
perl-doc, split 90/10 by page (see scripts/build_manpages_demo.py and data/manpages/README.md).

  task "demo_manpages"            train pairs from train.tsv.gz, demo vocabulary (8000 pieces)
  eval set "demo_manpages_test"   test queries against the whole corpus (protocol "beir")
  eval set "demo_manpages_train"  the train queries (qrels/train.tsv) against the whole corpus:
                                  what hard-negative mining reads (samtone_jax.mine)

For choosing the demo's hyper-parameters without looking at the test queries, every 10th train
page (by query id) is held out:

  task "demo_manpages_tuning"     the train pairs of the other 9 in 10 train pages
  eval set "demo_manpages_dev"    the held-out train pages' queries against the whole corpus
"""

import functools
import os

from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import features
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

DEMO_DIR = vocab.DEMO_DATA_DIR
TRAIN_TASK = "demo_manpages"
TEST_EVAL_SET = "demo_manpages_test"
TRAIN_EVAL_SET = "demo_manpages_train"
TUNING_TASK = "demo_manpages_tuning"
DEV_EVAL_SET = "demo_manpages_dev"
DEV_EVERY = 10  # every 10th train page (sorted query ids) is a dev page
_MISSING_HELP = ("The demo data ships inside the package; reinstall samtone_jax (pip install -e .) "
                 "or rebuild it with scripts/build_manpages_demo.py.")


def train_pairs(directory: str = DEMO_DIR):
  """Yields {"queries", "passages"} from train.tsv.gz (query<TAB>document), in file order."""
  path = readers.require_file(os.path.join(directory, "train.tsv.gz"), "demo train pairs",
                              _MISSING_HELP)
  for line, (query, document) in readers.iter_tsv(path, 2):
    yield {features.QUERIES: readers.check_text(path, line, "query", query),
           features.PASSAGES: readers.check_text(path, line, "document", document)}


def dev_query_ids(directory: str = DEMO_DIR) -> list[str]:
  """The held-out train pages' query ids: every DEV_EVERY-th of the sorted train qrels."""
  return sorted(beir.load_beir_split(directory, "train").qrels)[::DEV_EVERY]


def tuning_pairs(directory: str = DEMO_DIR):
  """The train pairs without the dev pages (matched by query text, so that a dev query never
  appears in training, even through a page with the same summary)."""
  data = beir.load_beir_split(directory, "train")
  dev_queries = {data.queries[q] for q in dev_query_ids(directory)}
  for pair in train_pairs(directory):
    if pair[features.QUERIES] not in dev_queries:
      yield pair


def dev_eval_set(directory: str, vocabulary) -> eval_sets.EvalSet:
  """The dev pages' queries against the whole corpus (protocol "beir")."""
  full = beir.beir_eval_set(DEV_EVAL_SET, directory, "train", vocabulary)
  keep = dev_query_ids(directory)
  return eval_sets.EvalSet(**{**full.__dict__, "queries": {q: full.queries[q] for q in keep},
                              "qrels": {q: full.qrels[q] for q in keep}})


def register(directory: str = DEMO_DIR) -> None:
  """Registers the demo task and eval set (replacing earlier registrations)."""
  vocabulary = vocab.demo_vocabulary()
  source = sources.examples_source({"train": functools.partial(train_pairs, directory)})
  beir.register_pairs_task(TRAIN_TASK, source, vocabulary, shuffle_buffer_size=10_000)
  loader = functools.partial(beir.beir_eval_set, TEST_EVAL_SET, directory, "test", vocabulary)
  eval_sets.register_eval_set(TEST_EVAL_SET, loader, overwrite=True)
  loader = functools.partial(beir.beir_eval_set, TRAIN_EVAL_SET, directory, "train", vocabulary)
  eval_sets.register_eval_set(TRAIN_EVAL_SET, loader, overwrite=True)
  tuning = sources.examples_source({"train": functools.partial(tuning_pairs, directory)})
  beir.register_pairs_task(TUNING_TASK, tuning, vocabulary, shuffle_buffer_size=10_000)
  eval_sets.register_eval_set(DEV_EVAL_SET, functools.partial(dev_eval_set, directory, vocabulary),
                              overwrite=True)
