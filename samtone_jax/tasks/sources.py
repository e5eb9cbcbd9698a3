"""seqio data sources built from Python readers of the official file formats.

`examples_source` serves the dual-encoder tasks (queries, passages, negatives);
`file_records_source` serves records of any typed fields read from files (the seq2seq tasks: KG
triples, QA examples).

Files are parsed in Python (so a malformed row raises `DataFormatError` with its file and line)
and handed to tf.data in chunks, which keeps the per-example cost of the Python boundary small.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import features

Example = Mapping[str, str | Sequence[str]]
_CHUNK = 1024


def _chunks(examples: Iterable[Example], num_negatives: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups examples into dicts of numpy string arrays of up to _CHUNK rows."""
  keys = [features.QUERIES, features.PASSAGES] + ([features.NEGATIVES] if num_negatives else [])
  buffer: dict[str, list] = {k: [] for k in keys}
  for example in examples:
    for k in keys:
      buffer[k].append(example[k])
    if len(buffer[features.QUERIES]) == _CHUNK:
      yield {k: np.array(v, dtype=object) for k, v in buffer.items()}
      buffer = {k: [] for k in keys}
  if buffer[features.QUERIES]:
    yield {k: np.array(v, dtype=object) for k, v in buffer.items()}


def examples_dataset(examples_fn: Callable[[], Iterable[Example]], num_negatives: int = 0
                     ) -> tf.data.Dataset:
  """A tf.data.Dataset of text examples {"queries": str, "passages": str, ["negatives": [N]]}.

  Args:
    examples_fn: called each time the dataset is iterated (each epoch); yields dicts of texts in
      a deterministic order.
    num_negatives: N, the number of hard negatives per example (0: no "negatives" feature).
  """
  signature = {features.QUERIES: tf.TensorSpec([None], tf.string),
               features.PASSAGES: tf.TensorSpec([None], tf.string)}
  if num_negatives:
    signature[features.NEGATIVES] = tf.TensorSpec([None, num_negatives], tf.string)
  ds = tf.data.Dataset.from_generator(lambda: _chunks(examples_fn(), num_negatives),
                                      output_signature=signature)
  return ds.unbatch()


def examples_source(examples_fns: Mapping[str, Callable[[], Iterable[Example]]], *,
                    num_negatives: int = 0, num_input_examples: Mapping[str, int] | None = None
                    ) -> seqio.FunctionDataSource:
  """A seqio source whose split `s` yields `examples_fns[s]()` (read in file order)."""

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one stream per split, shuffled downstream from the run's seed
    return examples_dataset(examples_fns[split], num_negatives)

  return seqio.FunctionDataSource(dataset_fn, splits=list(examples_fns),
                                  num_input_examples=num_input_examples)


# ---- records of any fields (seq2seq tasks) ---------------------------------------------------

# Field kinds of `records_source`: a scalar string, bool or int64, or a list of strings (e.g. a
# QA example's answers; lists may differ in length from example to example).
STRING, BOOL, INT64, STRING_LIST = "string", "bool", "int64", "string_list"
_DTYPES = {STRING: tf.string, BOOL: tf.bool, INT64: tf.int64, STRING_LIST: tf.string}
_NUMPY_DTYPES = {STRING: object, BOOL: np.bool_, INT64: np.int64}


def _record_chunks(records: Iterable[Mapping], spec: Mapping[str, str]
                   ) -> Iterator[dict[str, object]]:
  """Groups records into chunks of up to _CHUNK rows: numpy arrays, ragged for list fields."""
  buffer: dict[str, list] = {k: [] for k in spec}

  def flush():
    chunk = {}
    for key, kind in spec.items():
      if kind == STRING_LIST:
        chunk[key] = tf.ragged.constant(buffer[key], dtype=tf.string, ragged_rank=1)
      else:
        chunk[key] = np.array(buffer[key], dtype=_NUMPY_DTYPES[kind])
    return chunk

  for record in records:
    for key in spec:
      buffer[key].append(list(record[key]) if spec[key] == STRING_LIST else record[key])
    if len(buffer[next(iter(spec))]) == _CHUNK:
      yield flush()
      buffer = {k: [] for k in spec}
  if buffer[next(iter(spec))]:
    yield flush()


def records_dataset(records_fn: Callable[[], Iterable[Mapping]], spec: Mapping[str, str]
                    ) -> tf.data.Dataset:
  """A tf.data.Dataset of the records `records_fn()` yields, typed by `spec`.

  Args:
    records_fn: called each time the dataset is iterated (each epoch); yields dicts with the
      keys of `spec`, in a deterministic order.
    spec: field name -> STRING, BOOL, INT64 (scalars) or STRING_LIST ([A] strings, A >= 0).
  """
  signature = {}
  for key, kind in spec.items():
    if kind == STRING_LIST:
      signature[key] = tf.RaggedTensorSpec([None, None], tf.string, ragged_rank=1)
    else:
      signature[key] = tf.TensorSpec([None], _DTYPES[kind])
  ds = tf.data.Dataset.from_generator(lambda: _record_chunks(records_fn(), spec),
                                      output_signature=signature)
  return ds.unbatch()


def file_records_source(split_paths: Mapping[str, Callable[[], str]],
                        reader: Callable[[str], Iterable[Mapping]], spec: Mapping[str, str]
                        ) -> seqio.FunctionDataSource:
  """A seqio source whose split `s` yields `reader(split_paths[s]())` typed by `spec`.

  The path function runs when the split's dataset is built (not at registration, so data dirs
  configured later count; not inside tf.data, so its MissingDataError reaches the caller as is).
  """

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one stream per split, shuffled downstream from the run's seed
    path = split_paths[split]()
    return records_dataset(lambda: reader(path), spec)

  return seqio.FunctionDataSource(dataset_fn, splits=list(split_paths))
