"""The training input pipeline the trainer calls: per-host, deterministic, resumable batches.

For each task of a mixture (a task is a mixture of one):

  source (file order) -> shard by host -> shuffle (buffer, from `seed`, new order each epoch)
    -> repeat -> skip the examples already consumed -> task preprocessors (tokenise, EOS)
    -> DualEncoderFeatureConverter -> batch (global_batch_size // process_count, drop remainder)

Tasks are mixed by `rate` with a task-choice sequence drawn from `seed` in fixed-size chunks, so
the number of examples each task contributed before any position can be recomputed. Resuming at
step s therefore skips raw, untokenised examples (cheap) and yields exactly the batches s, s+1, ...
of an uninterrupted run. This needs preprocessors that map one example to one example (all tasks
here do). Every host builds the same choice sequence, so a step mixes tasks identically on all
hosts; each host reads a disjoint shard (element i of the source goes to host i % process_count).
"""

from collections.abc import Iterator, Mapping
import re

import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import feature_converter
from samtone_jax.tasks import features
from samtone_jax.tasks import preprocessors
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
                  shuffle_buffer_size: int | None = None) -> tf.data.Dataset:
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
  if buffer_size:
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


def get_train_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *,
                      seed: int, shard_info: seqio.ShardInfo, start_example: int = 0,
                      split: str = "train", num_epochs: int | None = None,
                      shuffle_buffer_size: int | None = None) -> tf.data.Dataset:
  """Unbatched model features for one host, starting at this host's example `start_example`."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks, rates = _tasks_and_rates(provider)
  negatives = with_negatives(mixture_or_task_name)
  if len(tasks) == 1:
    ds = task_examples(tasks[0], task_feature_lengths, split=split, seed=seed,
                       shard_info=shard_info, num_epochs=num_epochs, skip=start_example,
                       shuffle_buffer_size=shuffle_buffer_size)
  else:
    if num_epochs is not None:
      raise ValueError("num_epochs is only supported for a single task; mixtures repeat forever.")
    skips = mixture_counts(seed, rates, start_example)
    streams = [task_examples(t, task_feature_lengths, split=split, seed=_task_seed(seed, i),
                             shard_info=shard_info, num_epochs=None, skip=int(skips[i]),
                             shuffle_buffer_size=shuffle_buffer_size)
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


def get_train_iterator(mixture_or_task_name: str, task_feature_lengths: dict[str, int],
                       global_batch_size: int, *, seed: int, start_step: int = 0,
                       shard_info: seqio.ShardInfo | None = None, split: str = "train",
                       num_epochs: int | None = None,
                       shuffle_buffer_size: int | None = None
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
  ds = get_train_dataset(mixture_or_task_name, task_feature_lengths, seed=seed,
                         shard_info=shard_info, start_example=start_step * local_batch_size,
                         split=split, num_epochs=num_epochs,
                         shuffle_buffer_size=shuffle_buffer_size)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds)
