"""Where the datasets live: one place, read lazily, so registering tasks never touches disk.

Defaults come from environment variables; a gin file (or a notebook) overrides them by binding
and calling `configure_data_dirs`:

  SAMTONE_DATA_DIR       root for manually downloaded data (default ~/samtone_data)
  SAMTONE_MSMARCO_DIR    MS MARCO passage files (default $SAMTONE_DATA_DIR/msmarco)
  SAMTONE_MULTIREQA_DIR  MRQA .jsonl.gz + MultiReQA candidates (default $SAMTONE_DATA_DIR/multireqa)
  TFDS_DATA_DIR          TensorFlow Datasets data dir (default: TFDS's own, ~/tensorflow_datasets)
  SAMTONE_VOCAB_PATH     SentencePiece model of datasets without their own (default: T5's)

From the command line (every command calls `configure_data_dirs` with its gin bindings before it
registers the tasks; gin/runs/*.gin import this module):

  --gin.paths.configure_data_dirs.data_dir=\"/data\"
  --gin.paths.configure_data_dirs.vocabulary_paths='{"scifact": "/data/spm.model"}'
"""

from collections.abc import Mapping
import os

_OVERRIDES: dict[str, str | None] = {}
_VOCABULARY_PATHS: dict[str, str] = {}


def configure_data_dirs(*, data_dir: str | None = None, msmarco_dir: str | None = None,
                        multireqa_dir: str | None = None, tfds_data_dir: str | None = None,
                        vocabulary_paths: Mapping[str, str] | None = None) -> None:
  """Sets data locations for this process (None keeps the environment's/default value).

  Args:
    data_dir, msmarco_dir, multireqa_dir, tfds_data_dir: see the module docstring.
    vocabulary_paths: {dataset name: SentencePiece model path} for datasets registered by name
      (a BEIR directory `beir/<name>/`); T5's 100 extra ids are added on top. Must be set before
      `samtone_jax.tasks.all` is imported (the commands do so).
  """
  for key, value in (("data_dir", data_dir), ("msmarco_dir", msmarco_dir),
                     ("multireqa_dir", multireqa_dir), ("tfds_data_dir", tfds_data_dir)):
    if value is not None:
      _OVERRIDES[key] = value
  if vocabulary_paths:
    _VOCABULARY_PATHS.update({str(k): str(v) for k, v in vocabulary_paths.items()})


def reset_data_dirs() -> None:
  """Forgets `configure_data_dirs` overrides (tests)."""
  _OVERRIDES.clear()
  _VOCABULARY_PATHS.clear()


def vocabulary_path(dataset: str) -> str | None:
  """The SentencePiece model configured for `dataset`, or None (the default vocabulary)."""
  return _VOCABULARY_PATHS.get(dataset)


def data_dir() -> str:
  return _OVERRIDES.get("data_dir") or os.environ.get(
      "SAMTONE_DATA_DIR", os.path.join(os.path.expanduser("~"), "samtone_data"))


def msmarco_dir() -> str:
  return _OVERRIDES.get("msmarco_dir") or os.environ.get(
      "SAMTONE_MSMARCO_DIR", os.path.join(data_dir(), "msmarco"))


def multireqa_dir() -> str:
  return _OVERRIDES.get("multireqa_dir") or os.environ.get(
      "SAMTONE_MULTIREQA_DIR", os.path.join(data_dir(), "multireqa"))


def tfds_data_dir() -> str | None:
  return _OVERRIDES.get("tfds_data_dir") or os.environ.get("TFDS_DATA_DIR") or None
