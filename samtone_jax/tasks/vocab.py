"""SentencePiece vocabularies: T5's public one for full-size runs, the demos' own small ones.

Both follow T5's id convention (pad=0, eos=1, unk=2, no BOS) that `features.py` relies on.
"""

import os

import seqio
import tensorflow as tf

from samtone_jax import errors
from samtone_jax.tasks import paths
from samtone_jax.tasks import readers

# T5's public English SentencePiece model (32,000 pieces; T5 models use vocab_size 32128 with
# the 100 sentinel ids on top). Full-size runs default to it.
T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
T5_VOCAB_URL = "https://storage.googleapis.com/t5-data/vocabs/cc_all.32000/sentencepiece.model"
VOCAB_HELP = (
    "Download T5's vocabulary ({url}, or `gsutil cp {gs} .`) or use your own SentencePiece "
    "model, put it on a disk this machine reads, and point at it: for every dataset with "
    "SAMTONE_VOCAB_PATH=/path/sentencepiece.model, or per BEIR dataset with "
    "--gin.paths.configure_data_dirs.vocabulary_paths="
    "'{{\"<name>\": \"/path/sentencepiece.model\"}}'."
).format(url=T5_VOCAB_URL, gs=T5_VOCAB_PATH)
T5_EXTRA_IDS = 100

DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "manpages")
# Trained by scripts/build_manpages_demo.py on the demo corpus: 8000 pieces, no extra ids, so a
# model that reads it needs vocab_size >= DEMO_VOCAB_SIZE.
DEMO_VOCAB_PATH = os.path.join(DEMO_DATA_DIR, "sentencepiece.model")
DEMO_VOCAB_SIZE = 8000


def t5_vocabulary(path: str | None = None, extra_ids: int = T5_EXTRA_IDS
                  ) -> seqio.SentencePieceVocabulary:
  """T5's vocabulary, or the SentencePiece model at `path` (e.g. a local copy of it).

  Default path: $SAMTONE_VOCAB_PATH, else T5_VOCAB_PATH. The model file is read on first use.
  """
  path = path or os.environ.get("SAMTONE_VOCAB_PATH") or T5_VOCAB_PATH
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def dataset_vocabulary(dataset: str) -> seqio.SentencePieceVocabulary:
  """The vocabulary of a dataset registered by name (e.g. a BEIR directory `scifact`): the path
  set for it with `paths.configure_data_dirs(vocabulary_paths={dataset: path})` (T5's 100 extra
  ids on top), else `t5_vocabulary()`."""
  return t5_vocabulary(paths.vocabulary_path(dataset))


def check_available(path: str, user: str) -> None:
  """Raises MissingDataError (what, where, how to get it) if the SentencePiece model at `path`
  does not exist or its file system is unreachable (e.g. gs:// without network or credentials)."""
  try:
    found = tf.io.gfile.exists(path)
    problem = ""
  except tf.errors.OpError as e:
    found, problem = False, f" (unreachable: {e.message.splitlines()[0]})"
  if not found:
    raise readers.MissingDataError(f"SentencePiece vocabulary of {user}{problem}", path,
                                   VOCAB_HELP)


def check_fits(vocabulary: seqio.Vocabulary, model_vocab_size: int, user: str) -> None:
  """Checks that `vocabulary` exists and its ids fit a model with `model_vocab_size` embeddings.

  Raises:
    readers.MissingDataError: the SentencePiece file is missing or unreachable.
    errors.ConfigError: the vocabulary (pieces + extra ids) has more ids than the model.
  """
  path = getattr(vocabulary, "sentencepiece_model_file", None)
  if path:
    check_available(path, user)
  size = vocabulary.vocab_size
  if size > model_vocab_size:
    extra = getattr(vocabulary, "extra_ids", 0)
    raise errors.ConfigError(
        f"The vocabulary of {user} ({path or type(vocabulary).__name__}) has {size} ids"
        + (f" ({size - extra} pieces + {extra} extra ids)" if extra else "")
        + f", more than config.T5Config.vocab_size = {model_vocab_size}: set "
        f"--gin.config.T5Config.vocab_size={size} (or a larger multiple of 128).")


def demo_vocabulary() -> seqio.SentencePieceVocabulary:
  """The demo dataset's own 8000-piece vocabulary, shipped with the package."""
  return seqio.SentencePieceVocabulary(DEMO_VOCAB_PATH, extra_ids=0)


WORDNET_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wordnet")
# Trained by scripts/build_wordnet_kg.py on the WordNet KG and its questions: 2,000 pieces, plus
# T5's 100 sentinels (the SKILL objective masks spans with <extra_id_0>, id 2,099), so a model
# that reads it needs vocab_size >= WORDNET_VOCAB_SIZE + T5_EXTRA_IDS = 2,100.
WORDNET_VOCAB_PATH = os.path.join(WORDNET_DATA_DIR, "sentencepiece.model")
WORDNET_VOCAB_SIZE = 2000


def wordnet_vocabulary() -> seqio.SentencePieceVocabulary:
  """The WordNet SKILL demo's own vocabulary (shipped with the package) with T5's 100 sentinels."""
  return seqio.SentencePieceVocabulary(WORDNET_VOCAB_PATH, extra_ids=T5_EXTRA_IDS)
