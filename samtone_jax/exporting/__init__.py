"""Writing a trained dual encoder in other ecosystems' formats (`python -m samtone_jax.export`).

  staging.py                    the export directory: refuse a non-empty one, write beside it,
                                rename.
  model_card.py                 README.md of an export: architecture, step, eval metrics,
                                config.gin.
  sentence_transformers_dir.py  a sentence-transformers / Hugging Face directory (PyTorch).
  saved_model.py                a TF SavedModel, strings in, embeddings out (jax2tf + tf-text).
  t5x_checkpoint.py             a t5x checkpoint (parameters only), the initial checkpoint of
                                `python -m t5x.train` (gin/t5x/initial_checkpoint.gin).

The tensor mapping itself is model code (`samtone_jax.models.hf_export`); these modules only write.
"""

from typing import Any

import seqio

from samtone_jax.exporting import model_card
from samtone_jax.exporting import staging
from samtone_jax.models.config import DualEncoderConfig

FORMATS = ("sentence_transformers", "saved_model", "t5x")
ExportError = staging.ExportError


def sentencepiece_model_of(vocabulary: seqio.Vocabulary, task: str) -> bytes:
  """The serialized SentencePiece model of `vocabulary` (what the exported tokenizer encodes
  with), or an ExportError naming `task` when the vocabulary is not SentencePiece."""
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    raise ExportError(f"task {task!r} uses a {type(vocabulary).__name__}; only SentencePiece "
                      "vocabularies can be exported (the exported tokenizer is built from it).")
  return vocabulary.sp_model


def export_model(config: DualEncoderConfig, params: Any, *, step_dir: str,
                 sentencepiece_model: bytes | None, max_seq_lengths: dict[str, int], export_dir: str,
                 export_format: str = "sentence_transformers", overwrite: bool = False) -> str:
  """Writes the dual encoder `params` to `export_dir` in `export_format`, with a model card.

  Args:
    config: the architecture.
    params: the `DualEncoder` params collection (host or device arrays).
    step_dir: the checkpoints/<step> directory they came from, or the public weights' directory
      (for the model card).
    sentencepiece_model: the serialized SentencePiece model the model was trained with (None for
      "t5x", which holds no tokenizer).
    max_seq_lengths: {"queries": Lq, "passages": Lp}: the token lengths (EOS included) texts are
      cut to, normally the training lengths.
    export_dir: the local output directory; must be absent or empty unless `overwrite`.
    export_format: one of FORMATS.
    overwrite: replace a non-empty `export_dir` (only once the new export is complete).

  Returns:
    The export directory.

  Raises:
    ExportError: an unknown format, or an `export_dir` that may not be written.
  """
  if export_format not in FORMATS:
    raise ExportError(f"EXPORT_FORMAT={export_format!r}; expected one of {FORMATS}.")
  staging.check_export_dir(export_dir, overwrite)
  record = model_card.checkpoint_record(step_dir)
  with staging.staged_directory(export_dir, overwrite) as directory:
    if export_format == "sentence_transformers":
      from samtone_jax.exporting import sentence_transformers_dir as writer  # pylint: disable=g-import-not-at-top
    elif export_format == "t5x":
      from samtone_jax.exporting import t5x_checkpoint as writer  # pylint: disable=g-import-not-at-top
    else:
      from samtone_jax.exporting import saved_model as writer  # pylint: disable=g-import-not-at-top
    writer.write(directory, config, params, sentencepiece_model, max_seq_lengths)
    card = model_card.render(record, config, export_format=export_format,
                             max_seq_lengths=max_seq_lengths,
                             usage=writer.USAGE.replace("{path}", str(
                                 staging.local_export_dir(export_dir))))
    (directory / "README.md").write_text(card)
  return str(staging.local_export_dir(export_dir))
