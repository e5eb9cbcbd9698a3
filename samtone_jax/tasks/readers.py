"""Line-numbered readers for the data formats the tasks read: TSV and JSON Lines, plain or .gz.

Every row problem (wrong column count, bad id, invalid UTF-8, empty text, bad JSON, a missing
field) raises `DataFormatError` naming the file, the 1-based line and the problem, so a bad
download is never turned into a silently wrong example. (Where real data is known to have gaps,
e.g. MRQA contexts that MultiReQA did not annotate, the dataset module counts what it skips and
logs one warning.)

A missing input file raises `MissingDataError` saying what is missing, where to download it and
where to put it.
"""

from collections.abc import Iterator
import gzip
import json
import os
from typing import Any, IO

import tensorflow as tf

from samtone_jax import errors


class DataFormatError(errors.UserError, ValueError):
  """A row of an input file does not follow its format; the message names file and line."""

  def __init__(self, path: str, line: int | None, problem: str):
    self.path = path
    self.line = line
    self.problem = problem
    where = f"{path}, line {line}" if line is not None else path
    super().__init__(f"{where}: {problem}")


class MissingDataError(errors.UserError, FileNotFoundError):
  """Input data is not where the configuration says; the message says how to get it."""

  def __init__(self, what: str, expected_path: str, how_to_get: str):
    self.expected_path = expected_path
    super().__init__(f"Missing {what}: expected at {expected_path}. {how_to_get}")


def require_file(path: str, what: str, how_to_get: str) -> str:
  """Returns `path` if it exists (local or any tf.io.gfile file system), else raises."""
  if not tf.io.gfile.exists(path):
    raise MissingDataError(what, path, how_to_get)
  return path


def find_file(directory: str, name: str, what: str, how_to_get: str, *, required: bool = True
              ) -> str | None:
  """`directory/name`, or `directory/name.gz` if only the compressed file exists.

  Raises MissingDataError if neither exists and `required`; otherwise returns None then.
  """
  path = os.path.join(directory, name)
  for candidate in (path, path + ".gz"):
    if tf.io.gfile.exists(candidate):
      return candidate
  if required:
    raise MissingDataError(f"{what} ({name} or {name}.gz)", path, how_to_get)
  return None


def open_binary(path: str) -> IO[bytes]:
  """Opens a local or gs:// file for reading bytes, transparently un-gzipping `.gz`."""
  raw = tf.io.gfile.GFile(path, "rb")
  return gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line without the newline)."""
  with open_binary(path) as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataFormatError(path, line_number, f"invalid UTF-8 ({e.reason} at byte {e.start})")
      yield line_number, line.rstrip("\r\n") if line.endswith("\n") else line


def iter_tsv(path: str, num_columns: int, *, header: tuple[str, ...] | None = None
             ) -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, fields) of a tab-separated file with exactly `num_columns` columns.

  Args:
    path: the file (`.gz` is decompressed).
    num_columns: expected number of tab-separated fields on every row.
    header: if given, the first line must be exactly these column names.
  """
  for line_number, line in iter_lines(path):
    fields = line.split("\t")
    if header is not None and line_number == 1:
      if tuple(fields) != header:
        raise DataFormatError(path, 1, f"expected header {'<TAB>'.join(header)!r}, got {line!r}")
      continue
    if not line.strip():
      raise DataFormatError(path, line_number, "empty line")
    if len(fields) != num_columns:
      raise DataFormatError(path, line_number,
                            f"expected {num_columns} tab-separated columns, got {len(fields)}")
    yield line_number, fields


def iter_jsonl(path: str, required: dict[str, type] | None = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, object) of a JSON Lines file; checks required fields and their types."""
  for line_number, line in iter_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(path, line_number, f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
      raise DataFormatError(path, line_number, f"expected a JSON object, got {type(obj).__name__}")
    for field, field_type in (required or {}).items():
      if field not in obj:
        raise DataFormatError(path, line_number, f"missing field {field!r}")
      if not isinstance(obj[field], field_type):
        raise DataFormatError(path, line_number, f"field {field!r} should be {field_type.__name__},"
                              f" got {type(obj[field]).__name__}")
    yield line_number, obj


def check_text(path: str, line: int, field: str, text: str) -> str:
  """Returns `text` stripped; raises if nothing is left (an empty query or document)."""
  text = text.strip()
  if not text:
    raise DataFormatError(path, line, f"empty text in field {field!r}")
  return text


def check_int_id(path: str, line: int, field: str, value: str) -> int:
  """Parses a non-negative integer id (MS MARCO qids and pids)."""
  if not value.isdigit():
    raise DataFormatError(path, line, f"{field} should be a non-negative integer, got {value!r}")
  return int(value)


def check_str_id(path: str, line: int, field: str, value: Any) -> str:
  """Checks a string id (BEIR `_id`): non-empty, no tabs or newlines."""
  if isinstance(value, int) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str) or not value.strip() or any(c in value for c in "\t\n\r"):
    raise DataFormatError(path, line, f"bad {field} {value!r}: expected a non-empty string "
                          "without tabs or newlines")
  return value


def tfds_split(name: str, split: str, how_to_get: str, **as_dataset_kwargs):
  """`split` of the TFDS dataset `name` from the configured TFDS data dir (tf.data.Dataset).

  Raises MissingDataError (where TFDS looked, `how_to_get`) when it is not prepared there; TFDS
  is imported here, so registering TFDS-backed tasks never needs it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import paths  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=paths.tfds_data_dir())
  try:
    return builder.as_dataset(split=split, **as_dataset_kwargs)
  except (AssertionError, FileNotFoundError, ValueError) as e:
    raise MissingDataError(f"TFDS dataset {name} (split {split!r})", builder.data_dir,
                           how_to_get) from e
