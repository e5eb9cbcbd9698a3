"""SentencePiece vocabularies: T5's public one for full-size runs, the demo's own small one.

Both follow T5's id convention (pad=0, eos=1, unk=2, no BOS) that `features.py` relies on.
"""

import os

import seqio

# T5's public English SentencePiece model (32,000 pieces; T5 models use vocab_size 32128 with
# the 100 sentinel ids on top). Full-size runs default to it.
T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
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


def demo_vocabulary() -> seqio.SentencePieceVocabulary:
  """The demo dataset's own 8000-piece vocabulary, shipped with the package."""
  return seqio.SentencePieceVocabulary(DEMO_VOCAB_PATH, extra_ids=0)
