"""The training input pipeline the trainer calls: per-host, deterministic, resumable batches.

Two paths, chosen by `use_cached`:

Uncached (default): for each task of a mixture (a task is a mixture of one),

  source (file order) -> shard by host -> shuffle (buffer, from `seed`, new order each epoch)
    -> repeat -> skip the examples already consumed -> task preprocessors (tokenise, EOS)
    -> DualEncoderFeatureConverter -> batch (global_batch_size // process_count, drop remainder)

Every host reads and parses the whole source in a Python generator and keeps its share (element i
goes to host i % process_count), so the input rate does not grow with the host count. Tasks are
mixed by `rate` with a task-choice sequence drawn from `seed` in fixed-size chunks, so the number
of examples each task contributed before any position can be recomputed. Resuming at step s skips
the raw examples already consumed: this yields exactly the batches s, s+1, ... of an uninterrupted
run, but it costs as much as reading them (linear in s: ~80 min per host at 205M examples for
MS MARCO), and needs preprocessors that map one example to one example (all tasks here do).

Cached (`use_cached=True`, tasks written by `samtone-cache-tasks`, see `cache.py`): each host
reads its own TFRecord files of the cache (file i goes to host i % process_count when there are at
least as many files as hosts, else every host reads all files and keeps example i %
process_count), and everything runs in the TF graph:

  this host's files (order shuffled per epoch from `seed`) -> records -> shuffle (serialized
    records, task's buffer, new order each epoch) -> repeat -> parse (batched parse_example)
    -> post-cache preprocessors (trim, EOS) -> DualEncoderFeatureConverter -> batch

With the shuffle off (`shuffle_buffer_size=0`) and one host the cached stream is the cache's
files in order, i.e. exactly the uncached task's examples in source order. Mixtures of cached
tasks choose tasks with a stateless sampler (`tf.random.stateless_categorical` over fixed-size
chunks of positions, from `seed`): deterministic, but not the uncached path's choice sequence.

Constant-time resume (cached path): the position is a tf.data iterator checkpoint per host
(`InputIterator.save` / `.restore`, the way t5x does it), saved by the trainer inside the orbax
step directory, so restoring costs one read of that state (the shuffle buffer of serialized
records, the parse and prefetch buffers, file offsets) whatever the step, and reads no record
that was already consumed. We chose it over index-based sampling (Grain / ArrayRecord, as in
MaxText) because the seqio cache layout is TFRecord, which has no random access, and because it
keeps a real shuffle buffer; the price is a state file per host per checkpoint of about the
shuffle buffer's size (for MS MARCO's 100k-example buffer, 69 MiB per host, restored in ~5 s:
benchmarks/README.md, input_rate.py).

A change of host count is NOT supported on resume of a cached run: the saved position is per
host (its files and buffers); the trainer refuses with an error that names the process count the
checkpoint was written with. (The uncached path resumes at any host count, slowly.)
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import re

import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import cache
from samtone_jax.tasks import feature_converter
from samtone_jax.tasks import features
from samtone_jax.tasks import readers

_CHOICE_CHUNK = 1 << 16


def _task_seed(seed: int, task_index: int) -> int:
  return int(np.random.SeedSequence([seed, task_index]).generate_state(1, np.uint32)[0])


def _choice_chunk(seed: int, chunk: int, rates: np.ndarray) -> np.ndarray:
  """Task indices for mixture positions [chunk * C, (chunk + 1) * C)."""
  rng = np.random.default_rng([seed, 1 << 20, chunk])  # separate stream from the task seeds
  return rng.choice(len(rates), size=_CHOICE_CHUNK, p=rates / rates.sum()).astype(np.int64)


def mixture_counts(seed: int, rates: np.ndarray, num_examples: int) -> np.ndarray:
  """How many of the first `num_examples` mixture positions each task fills: int64 [T]."""
  counts = np.zeros(len(rates), np.int64)
  full_chunks, rest = divmod(num_examples, _CHOICE_CHUNK)
  for chunk in range(full_chunks):
    counts += np.bincount(_choice_chunk(seed, chunk, rates), minlength=len(rates))
  if rest:
    counts += np.bincount(_choice_chunk(seed, full_chunks, rates)[:rest], minlength=len(rates))
  return counts


def _choice_dataset(seed: int, rates: np.ndarray, start: int) -> tf.data.Dataset:
  """The task-choice sequence from position `start` on, forever."""

  def generate():
    chunk, offset = divmod(start, _CHOICE_CHUNK)
    while True:
      yield _choice_chunk(seed, chunk, rates)[offset:]
      chunk, offset = chunk + 1, 0

  return tf.data.Dataset.from_generator(
      generate, output_signature=tf.TensorSpec([None], tf.int64)).unbatch()


def task_examples(task: seqio.Task, task_feature_lengths: Mapping[str, int], *, split: str,
                  seed: int, shard_info: seqio.ShardInfo, num_epochs: int | None, skip: int,
                  shuffle_buffer_size: int | None = None, shuffle: bool = True
                  ) -> tf.data.Dataset:
  """One task's tokenised, EOS-terminated examples for this host, from example `skip` on.

  Returns:
    examples {"queries": int32 [<=Lq], "passages": int32 [<=Lp], ["negatives": [N, <=Lp]]},
    or for a seq2seq task {"inputs": int32 [<=Li], "targets": int32 [<=Lt]}.
  """
  ds = task.source.get_dataset(split=split, shuffle=False, seed=None)
  if shard_info.num_shards > 1:
    if num_epochs is not None:
      # A finite stream must give every host the same number of batches (or one host would wait
      # forever in a collective): each host takes floor(N / hosts) examples per epoch.
      total = task.source.num_input_examples(split) or int(ds.reduce(0, lambda n, _: n + 1))
      ds = ds.shard(shard_info.num_shards, shard_info.index).take(total // shard_info.num_shards)
    else:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
  buffer_size = shuffle_buffer_size or task.shuffle_buffer_size
  if buffer_size and shuffle:
    ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat(num_epochs)
  if skip:
    ds = ds.skip(skip)
  ds = task.preprocess_precache(ds, seed=seed)
  ds = task.preprocess_postcache(ds, sequence_length=dict(task_feature_lengths), seed=seed)
  keep = [k for k in (features.QUERIES, features.PASSAGES, features.NEGATIVES,
                      features.INPUTS, features.TARGETS)  # the last two: seq2seq tasks
          if k in task.output_features]
  return ds.map(lambda ex: {k: ex[k] for k in keep}, num_parallel_calls=tf.data.AUTOTUNE)


_PARSE_BATCH = 256  # records parsed per parse_example call (vectorised parsing)
_STATELESS_CHOICE_CHUNK = 4096


def _parse_spec(info: Mapping[str, object], keys: Sequence[str]
                ) -> dict[str, tf.io.RaggedFeature]:
  """Ragged parse features for the cached token ids (seqio.dict_to_tfexample's encoding)."""
  spec = {}
  for key in keys:
    rank = len(info["features"][key]["shape"])
    partitions = [tf.io.RaggedFeature.RowLengths(seqio.utils.tfexample_ragged_length_key(key, d))
                  for d in range(rank - 1)]
    spec[key] = tf.io.RaggedFeature(tf.int64, value_key=key, partitions=partitions,
                                    row_splits_dtype=tf.int64)
  return spec


def _host_example_counts(lengths: Sequence[int], num_hosts: int, file_level: bool) -> list[int]:
  if file_level:
    return [sum(lengths[h::num_hosts]) for h in range(num_hosts)]
  return [sum(lengths) // num_hosts] * num_hosts


def cached_task_examples(task: seqio.Task, task_feature_lengths: Mapping[str, int], *,
                         split: str, seed: int, shard_info: seqio.ShardInfo,
                         num_epochs: int | None, cache_dirs: Sequence[str] = (),
                         shuffle_buffer_size: int | None = None, shuffle: bool = True,
                         record_counter: Callable[[], None] | None = None,
                         files_read: list[str] | None = None) -> tf.data.Dataset:
  """One task's examples for this host, read from its cache (module doc: "Cached").

  Args:
    task: a task cached by `cache.cache_task` (or seqio's cache_tasks_main).
    task_feature_lengths: {"queries": Lq, "passages": Lp}.
    split, seed, shard_info, num_epochs: as in `get_train_iterator`.
    cache_dirs: global cache directories to search before seqio's own.
    shuffle_buffer_size: examples in the shuffle buffer; None: the task's.
    shuffle: False reads the files in order and does not shuffle (the documented order).
    record_counter: called once per record read from a file (instrumentation for the resume
      tests and benchmarks; it makes the pipeline's state depend on Python, so its iterator
      state is saved with `experimental_external_state_policy` WARN).
    files_read: if given, this host's files are appended to it (for error messages).

  Returns:
    examples {"queries": int32 [<=Lq], "passages": int32 [<=Lp], ["negatives": [N, <=Lp]]}.

  Raises:
    cache.CacheError: no cache, or one of another task / vocabulary, or a missing or truncated
      shard (named).
  """
  task_dir = cache.find_cache_dir(task, cache_dirs)
  paths = cache.check_cache(task, task_dir, split, shard_info)
  info = cache.read_info(task_dir, split)
  num_hosts, host = shard_info.num_shards, shard_info.index
  file_level = len(paths) >= num_hosts
  host_paths = paths[host::num_hosts] if file_level else paths
  if files_read is not None:
    files_read.extend(host_paths)
  files = tf.data.Dataset.from_tensor_slices(host_paths)
  if shuffle:
    files = files.shuffle(len(host_paths), seed=seed, reshuffle_each_iteration=True)
  ds = tf.data.TFRecordDataset(files, buffer_size=1 << 20)
  if record_counter is not None:
    def count(record):
      record_counter()
      return record
    ds = ds.map(lambda r: tf.ensure_shape(tf.py_function(count, [r], tf.string), []))
  if not file_level:
    ds = ds.shard(num_hosts, host)
  if num_epochs is not None and num_hosts > 1:
    # Every host must yield the same number of batches (see `task_examples`).
    lengths = info.get(cache.SAMTONE_KEY, {}).get("shard_lengths")
    if lengths is None:
      raise cache.CacheError(seqio.get_cached_info_path(task_dir, split), None,
                             "has no shard lengths (not written by samtone-cache-tasks): "
                             "num_epochs with several hosts needs them.")
    ds = ds.take(min(_host_example_counts(lengths, num_hosts, file_level)))
  buffer_size = shuffle_buffer_size or task.shuffle_buffer_size
  if buffer_size and shuffle:
    ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat(num_epochs)
  keys = [k for k in (features.QUERIES, features.PASSAGES, features.NEGATIVES)
          if k in task.output_features]
  spec = _parse_spec(info, keys)

  def parse(records):
    parsed = tf.io.parse_example(records, spec)
    return {k: tf.cast(v, tf.int32) for k, v in parsed.items()}

  ds = ds.batch(_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  ds = task.preprocess_postcache(ds, sequence_length=dict(task_feature_lengths), seed=seed)
  return ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)


def _stateless_choice_dataset(seed: int, rates: np.ndarray) -> tf.data.Dataset:
  """Task indices of the cached mixture, forever: chunk c of positions is drawn with the
  stateless seed (seed, c), so the sequence is a pure function of `seed` and the iterator
  checkpoint only holds a chunk number and an offset."""
  logits = tf.constant(np.log(rates / rates.sum())[None], tf.float32)
  base = tf.constant(seed % (1 << 31), tf.int64)

  def chunk(index):
    return tf.random.stateless_categorical(logits, _STATELESS_CHOICE_CHUNK,
                                           seed=tf.stack([base, index]), dtype=tf.int64)[0]

  return tf.data.Dataset.range(1 << 62).map(chunk).unbatch()


def _tasks_and_rates(provider: seqio.DatasetProviderBase) -> tuple[list[seqio.Task], np.ndarray]:
  if isinstance(provider, seqio.Mixture):
    tasks = list(provider.tasks)
    return tasks, np.array([provider.get_rate(t) for t in tasks], np.float64)
  return [provider], np.ones(1)


def with_negatives(mixture_or_task_name: str) -> bool:
  """Whether the task (every task of the mixture) has hard negatives."""
  tasks, _ = _tasks_and_rates(seqio.get_mixture_or_task(mixture_or_task_name))
  has = {features.NEGATIVES in t.output_features for t in tasks}
  if len(has) > 1:
    raise ValueError(f"{mixture_or_task_name!r} mixes tasks with and without hard negatives.")
  return has.pop()


def num_negatives(mixture_or_task_name: str, split: str = "train") -> int:
  """N, the hard negatives per example of the task (of every task of the mixture); 0: none.

  The task's features decide it: no "negatives" output feature gives 0, otherwise N is the
  static length of the source's "negatives" feature (`sources.examples_source(num_negatives=N)`
  declares it). Nothing is read: the source's dataset is only constructed.

  Raises:
    ValueError: a mixture's tasks disagree, or a source does not declare N statically.
  """
  if not with_negatives(mixture_or_task_name):
    return 0
  tasks, _ = _tasks_and_rates(seqio.get_mixture_or_task(mixture_or_task_name))
  counts = {}
  for task in tasks:
    spec = task.source.get_dataset(split=split, shuffle=False, seed=None).element_spec
    shape = spec[features.NEGATIVES].shape
    if shape.rank != 1 or shape[0] is None:
      raise ValueError(f"task {task.name!r}: its source's {features.NEGATIVES!r} feature has "
                       f"shape {shape}, not [N] with a fixed number N of hard negatives per "
                       "example (build it with sources.examples_source(num_negatives=N)).")
    counts[task.name] = int(shape[0])
  if len(set(counts.values())) > 1:
    raise ValueError(f"{mixture_or_task_name!r} mixes tasks with different numbers of hard "
                     f"negatives per example: {counts}.")
  return next(iter(counts.values()))


def get_train_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *,
                      seed: int, shard_info: seqio.ShardInfo, start_example: int = 0,
                      split: str = "train", num_epochs: int | None = None,
                      shuffle_buffer_size: int | None = None, shuffle: bool = True,
                      use_cached: bool = False, cache_dirs: Sequence[str] = (),
                      record_counter: Callable[[], None] | None = None,
                      files_read: list[str] | None = None) -> tf.data.Dataset:
  """Unbatched model features for one host, starting at this host's example `start_example`.

  With `use_cached` the stream always starts at example 0 (`start_example` must be 0): a cached
  stream is resumed by restoring its iterator state (`InputIterator.restore`).
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks, rates = _tasks_and_rates(provider)
  negatives = with_negatives(mixture_or_task_name)
  if use_cached:
    if start_example:
      raise ValueError("A cached stream resumes from its iterator state, not by skipping: "
                       f"start_example={start_example} must be 0.")
    if len(tasks) > 1 and num_epochs is not None:
      raise ValueError("num_epochs is only supported for a single task; mixtures repeat forever.")
    streams = [cached_task_examples(
        t, task_feature_lengths, split=split, seed=seed if len(tasks) == 1 else _task_seed(seed, i),
        shard_info=shard_info, num_epochs=num_epochs, cache_dirs=cache_dirs,
        shuffle_buffer_size=shuffle_buffer_size, shuffle=shuffle, record_counter=record_counter,
        files_read=files_read) for i, t in enumerate(tasks)]
    ds = streams[0] if len(tasks) == 1 else tf.data.Dataset.choose_from_datasets(
        streams, _stateless_choice_dataset(seed, rates))
  elif len(tasks) == 1:
    ds = task_examples(tasks[0], task_feature_lengths, split=split, seed=seed,
                       shard_info=shard_info, num_epochs=num_epochs, skip=start_example,
                       shuffle_buffer_size=shuffle_buffer_size, shuffle=shuffle)
  else:
    if num_epochs is not None:
      raise ValueError("num_epochs is only supported for a single task; mixtures repeat forever.")
    skips = mixture_counts(seed, rates, start_example)
    streams = [task_examples(t, task_feature_lengths, split=split, seed=_task_seed(seed, i),
                             shard_info=shard_info, num_epochs=None, skip=int(skips[i]),
                             shuffle_buffer_size=shuffle_buffer_size, shuffle=shuffle)
               for i, t in enumerate(tasks)]
    ds = tf.data.Dataset.choose_from_datasets(streams, _choice_dataset(seed, rates, start_example))
  if features.INPUTS in task_feature_lengths:  # a seq2seq task: the encoder-decoder's features
    return seqio.EncDecFeatureConverter(pack=False)(
        ds, {k: task_feature_lengths[k] for k in (features.INPUTS, features.TARGETS)})
  converter = feature_converter.DualEncoderFeatureConverter(with_negatives=negatives)
  lengths = {features.QUERIES: task_feature_lengths[features.QUERIES],
             features.PASSAGES: task_feature_lengths[features.PASSAGES]}
  return converter(ds, lengths)


_WRAPPED_FORMAT_ERROR = re.compile(r"DataFormatError: (.+?)(?:, line (\d+))?: (.*?)(?:\n|$)")
_WRAPPED_MISSING_ERROR = re.compile(r"MissingDataError: Missing (.+?): expected at (.+?)\. (.*?)"
                                    r"(?:\n|$)")


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates as numpy; a file error raised inside tf.data (which wraps Python exceptions of
  sources in a tf.errors.OpError) is raised again as the original DataFormatError or
  MissingDataError.

  The tf.data iterator is destroyed when this generator ends, fails or is closed, not left to
  the garbage collector: an iterator whose `from_generator` source raised, kept alive by the
  exception's traceback until interpreter exit, was destroyed while Python was finalising, its
  prefetch threads waited for a GIL they could no longer take, and the process never exited.
  """
  iterator = ds.as_numpy_iterator()
  try:
    while True:
      error = None
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        error = _file_error(str(e.message))
        if error is None:
          raise
      if error is not None:
        # Raised outside the `except`: the OpError (whose traceback holds the iterator) is not
        # kept as its context.
        raise error
      yield batch
  finally:
    del iterator  # the last reference: the pipeline shuts down here, in this thread


def _file_error(message: str) -> Exception | None:
  """The DataFormatError / MissingDataError a tf.data error message wraps, or None."""
  match = _WRAPPED_FORMAT_ERROR.search(message)
  if match:
    path, line, problem = match.groups()
    return readers.DataFormatError(path, int(line) if line else None, problem)
  match = _WRAPPED_MISSING_ERROR.search(message)
  if match:
    return readers.MissingDataError(*match.groups())
  return None


class InputIterator:
  """Numpy batches of a cached-task pipeline whose position can be saved and restored.

  A tf.data iterator checkpoint (`tf.train.Checkpoint(iterator=...)`): `save(prefix)` writes this
  host's position (TF checkpoint files `prefix.index`, `prefix.data-*`), `restore(prefix)` puts a
  freshly built iterator of the same pipeline there, so that its next batch is the one the saved
  iterator would have given. Restoring reads the state, never the records consumed before it.
  """

  def __init__(self, ds: tf.data.Dataset, files: Sequence[str] = ()):
    self._iterator = iter(ds)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._files = list(files)

  def __iter__(self) -> "InputIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    error = None
    try:
      batch = next(self._iterator)
    except tf.errors.DataLossError as e:
      error = self._damaged_file_error(str(e.message))
    if error is not None:
      raise error
    return {k: v.numpy() for k, v in batch.items()}

  def _damaged_file_error(self, message: str) -> Exception:
    """tf.data names no file for a bad record: find it by reading this host's files again."""
    try:
      cache.verify_records(self._files)
    except cache.CacheError as e:
      return e
    return cache.CacheError(", ".join(self._files) or "the task cache", None,
                            f"a record could not be read ({message.splitlines()[0]}).")

  def save(self, prefix: str) -> str:
    """Writes the position (local or gs://); returns the checkpoint prefix written."""
    return self._checkpoint.write(prefix)

  def restore(self, prefix: str) -> None:
    """Moves this (fresh) iterator to the position saved at `prefix`."""
    self._checkpoint.read(prefix).assert_consumed()

  def close(self) -> None:
    """Shuts the pipeline down now, in this thread (see `_numpy_batches`)."""
    self._checkpoint = None
    self._iterator = None


def get_train_iterator(mixture_or_task_name: str, task_feature_lengths: dict[str, int],
                       global_batch_size: int, *, seed: int, start_step: int = 0,
                       shard_info: seqio.ShardInfo | None = None, split: str = "train",
                       num_epochs: int | None = None,
                       shuffle_buffer_size: int | None = None, shuffle: bool = True,
                       use_cached: bool = False, cache_dirs: Sequence[str] = (),
                       record_counter: Callable[[], None] | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Per-host numpy training batches of a registered seqio task or mixture.

  Args:
    mixture_or_task_name: e.g. "demo_manpages", "msmarco_passage_train", "multireqa_in_domain".
    task_feature_lengths: {"queries": Lq, "passages": Lp}; hard negatives use Lp. Seq2seq
      tasks: {"inputs": Li, "targets": Lt}, batches of seqio.EncDecFeatureConverter(pack=False):
      "encoder_input_tokens" [b, Li], "decoder_{input,target}_tokens" and
      "decoder_loss_weights" [b, Lt].
    global_batch_size: B, rows per step over all hosts; must be divisible by the host count.
    seed: fixes the shuffle order (reshuffled every epoch) and the mixture's task choices.
    start_step: batch k of this iterator is batch start_step + k of one started at step 0.
    shard_info: this host's shard; default (jax.process_index(), jax.process_count()).
    split: the source split.
    num_epochs: None repeats forever; otherwise stop after that many passes (single task only;
      with several hosts each reads floor(N / hosts) examples per epoch, so all hosts yield the
      same number of batches).
    shuffle_buffer_size: override of the task's shuffle buffer (examples).
    shuffle: False: source (or cache file) order, no shuffling.
    use_cached: read the tasks' caches (module doc, "Cached"); the result is an `InputIterator`
      started at step 0 (resume with its `restore`; `start_step` must be 0).
    cache_dirs: cache directories searched before seqio's global ones (cached path).
    record_counter: called once per record read from a cache file (tests, benchmarks).

  Returns:
    an iterator of dicts with b = B // process_count rows: "queries" int32 [b, Lq], "passages"
    int32 [b, Lp], "negatives" int32 [b, N, Lp] (tasks with hard negatives), "query_ids" and
    "passage_ids" int32 [b] (token-sequence fingerprints).
  """
  if shard_info is None:
    import jax  # pylint: disable=g-import-not-at-top  (data code needs JAX only for the default)
    shard_info = seqio.ShardInfo(jax.process_index(), jax.process_count())
  if global_batch_size % shard_info.num_shards:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{shard_info.num_shards} hosts.")
  local_batch_size = global_batch_size // shard_info.num_shards
  files: list[str] = []
  ds = get_train_dataset(mixture_or_task_name, task_feature_lengths, seed=seed,
                         shard_info=shard_info, start_example=start_step * local_batch_size,
                         split=split, num_epochs=num_epochs,
                         shuffle_buffer_size=shuffle_buffer_size, shuffle=shuffle,
                         use_cached=use_cached, cache_dirs=cache_dirs,
                         record_counter=record_counter, files_read=files)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  if not use_cached:
    return _numpy_batches(ds)
  if record_counter is not None:
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.WARN
    ds = ds.with_options(options)
  return InputIterator(ds, files)
