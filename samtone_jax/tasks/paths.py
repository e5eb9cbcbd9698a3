"""Where the datasets live: one place, read lazily, so registering tasks never touches disk.

Defaults come from environment variables; a gin file (or a notebook) overrides them by binding
and calling `configure_data_dirs`:

  SAMTONE_DATA_DIR       root for manually downloaded data (default ~/samtone_data)
  SAMTONE_MSMARCO_DIR    MS MARCO passage files (default $SAMTONE_DATA_DIR/msmarco)
  SAMTONE_MULTIREQA_DIR  MRQA .jsonl.gz + MultiReQA candidates (default $SAMTONE_DATA_DIR/multireqa)
  TFDS_DATA_DIR          TensorFlow Datasets data dir (default: TFDS's own, ~/tensorflow_datasets)
"""

import os

_OVERRIDES: dict[str, str | None] = {}


def configure_data_dirs(*, data_dir: str | None = None, msmarco_dir: str | None = None,
                        multireqa_dir: str | None = None, tfds_data_dir: str | None = None) -> None:
  """Sets data locations for this process (None keeps the environment's/default value)."""
  for key, value in (("data_dir", data_dir), ("msmarco_dir", msmarco_dir),
                     ("multireqa_dir", multireqa_dir), ("tfds_data_dir", tfds_data_dir)):
    if value is not None:
      _OVERRIDES[key] = value


def reset_data_dirs() -> None:
  """Forgets `configure_data_dirs` overrides (tests)."""
  _OVERRIDES.clear()


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
