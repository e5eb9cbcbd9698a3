"""Cached tasks: a task's token ids written once as TFRecord shards in seqio's cached-task layout.

`cache_task(name, output_cache_dir)` runs the task's source and its pre-cache preprocessors
(tokenisation; see `preprocessors.tokenize`) once and writes

  <output_cache_dir>/<task name>/
    <split>.tfrecord-00000-of-00016 ...   tf.train.Examples (seqio.dict_to_tfexample's encoding)
    info.<split>.json                      {"num_shards", "features", "seqio_version", "samtone"}
    stats.<split>.json                     {"examples", "<feature>_tokens", "<feature>_max_tokens"}
    COMPLETED                              written last: seqio treats the directory as a cache

which is what seqio's own Beam pipeline (`seqio.scripts.cache_tasks_main`) writes, so
`seqio.add_global_cache_dirs([output_cache_dir])` makes `task.get_dataset(..., use_cached=True)`
read it, and `pipeline.get_train_iterator(..., use_cached=True)` reads it host by host.

Order: shard k holds examples [k * N // S, (k + 1) * N // S) of the source, in source order, so
reading the shards one after another yields exactly the uncached task's examples. (seqio's Beam
writer reshuffles examples between shards, so its caches are equally valid but their order is
not the source's.)

"samtone" in info.<split>.json records what the cache was made from and how to check it: the task
name, a fingerprint of each feature's vocabulary (class, SentencePiece model sha256, extra ids),
and every shard's example count and byte size. `check_cache` compares them with the registered
task and the files before training reads a record, so a cache of another task or vocabulary, a
missing shard or a truncated one is named before it can train a model on wrong ids.

This writer is one process (plain TF; Apache Beam 2.77 needs protobuf < 7, which the sentencepiece
this package runs with refuses): fine for this machine and the demo, hours for full MS MARCO (400M
triples); see README "Cached tasks" for the Dataflow route with seqio's own Beam pipeline.
"""

from collections.abc import Mapping, Sequence
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import readers

COMPLETED = "COMPLETED"
SAMTONE_KEY = "samtone"
CACHE_HELP = ("Write the cache with `samtone-cache-tasks --tasks={task} "
              "--output_cache_dir=DIR` (or run without USE_CACHED_TASKS).")


class CacheError(readers.DataFormatError):
  """A task cache does not match its task or is damaged; the message names the file."""


def task_cache_dir(cache_root: str, task_name: str) -> str:
  """Where seqio looks for `task_name` under a global cache directory."""
  return os.path.join(cache_root, seqio.utils.get_task_dir_from_name(task_name))


def shard_path(task_dir: str, split: str, index: int, num_shards: int) -> str:
  """Beam's shard naming (seqio's `<split>.tfrecord-*-of-*<num_shards>` pattern matches it)."""
  return f"{seqio.get_cached_tfrecord_prefix(task_dir, split)}-{index:05d}-of-{num_shards:05d}"


def vocabulary_fingerprint(vocabulary: seqio.Vocabulary) -> dict[str, Any]:
  """What identifies a vocabulary's ids: its class, extra ids and SentencePiece model bytes."""
  result: dict[str, Any] = {"class": type(vocabulary).__name__,
                            "extra_ids": int(getattr(vocabulary, "extra_ids", 0) or 0),
                            "vocab_size": int(vocabulary.vocab_size)}
  model = getattr(vocabulary, "sp_model", None)
  if model is not None:
    result["sha256"] = hashlib.sha256(model).hexdigest()
  return result


def _int64_feature(values: np.ndarray) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))


def _serialize(example: Mapping[str, Any], ragged: Sequence[str]) -> bytes:
  """One example as seqio.dict_to_tfexample encodes it (ragged features: flat values + the
  row lengths under `seqio.utils.tfexample_ragged_length_key(key, 0)`); numpy in, no TF ops."""
  feature = {}
  for key, value in example.items():
    if key in ragged:
      rows = [np.asarray(row, np.int64) for row in value]
      flat = np.concatenate(rows) if rows else np.zeros([0], np.int64)
      feature[key] = _int64_feature(flat)
      feature[seqio.utils.tfexample_ragged_length_key(key, 0)] = _int64_feature(
          np.array([len(r) for r in rows], np.int64))
    else:
      feature[key] = _int64_feature(np.asarray(value, np.int64))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _precache_examples(task: seqio.Task, split: str) -> tf.data.Dataset:
  ds = task.source.get_dataset(split=split, shuffle=False, seed=None)
  return task.preprocess_precache(ds, seed=None)


def cache_task(task_name: str, output_cache_dir: str, *, split: str = "train",
               num_shards: int = 16, overwrite: bool = False) -> str:
  """Writes `task_name`'s `split` as a seqio cached task under `output_cache_dir`.

  The examples are counted first (the source is read twice: a count, then the write), so the
  shards get contiguous, nearly equal ranges of the source order. The task directory is written
  under a temporary name and renamed when complete: an interrupted run leaves no cache that
  seqio or the trainer would take for a complete one.

  Args:
    task_name: a registered task with a `seqio.CacheDatasetPlaceholder` (every dual-encoder task
      registered by `beir.register_pairs_task` has one).
    output_cache_dir: the global cache directory (local or gs://); the task goes to
      `<output_cache_dir>/<task_name>/`.
    split: the split to write.
    num_shards: S, the number of TFRecord files; use at least the number of training hosts
      (each host then reads whole files), ideally a multiple of it.
    overwrite: replace an existing cache of the task; otherwise an existing one is an error.

  Returns:
    the task's cache directory.

  Raises:
    CacheError: the cache exists (without `overwrite`) or the task has no cache point.
    readers.DataFormatError / MissingDataError: the task's raw data is bad or missing.
  """
  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task) or not task.supports_caching:
    raise CacheError(task_name, None, "is not a seqio Task with a CacheDatasetPlaceholder; only "
                     "tasks can be cached (cache each task of a mixture).")
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1.")
  task_dir = task_cache_dir(output_cache_dir, task_name)
  if tf.io.gfile.exists(task_dir):
    if not overwrite:
      raise CacheError(task_dir, None, "exists already; pass --overwrite to replace it.")
    tf.io.gfile.rmtree(task_dir)
  tmp_dir = f"{task_dir}.incomplete-{os.getpid()}"
  if tf.io.gfile.exists(tmp_dir):
    tf.io.gfile.rmtree(tmp_dir)
  tf.io.gfile.makedirs(tmp_dir)

  start = time.time()
  # Counted on the raw source (no tokenisation), so the shards get contiguous equal ranges.
  raw = task.source.get_dataset(split=split, shuffle=False, seed=None)
  total = task.source.num_input_examples(split) or int(raw.reduce(np.int64(0), lambda n, _: n + 1))
  if total < num_shards:
    raise CacheError(task_name, None, f"split {split!r} has {total} examples, fewer than "
                     f"num_shards={num_shards}: use fewer shards.")
  bounds = [k * total // num_shards for k in range(num_shards + 1)]
  keys = [k for k in task.output_features if k in _precache_examples(task, split).element_spec]
  ragged = [k for k in keys if task.output_features[k].rank == 2]
  tokens = {k: 0 for k in keys}
  max_tokens = {k: 0 for k in keys}
  shard_lengths, shard_bytes = [], []
  examples = _precache_examples(task, split).as_numpy_iterator()
  for shard in range(num_shards):
    path = shard_path(tmp_dir, split, shard, num_shards)
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(bounds[shard + 1] - bounds[shard]):
        example = next(examples)
        example = {k: (list(example[k]) if k in ragged else example[k]) for k in keys}
        for k in keys:
          n = sum(len(r) for r in example[k]) if k in ragged else len(example[k])
          tokens[k] += n
          max_tokens[k] = max(max_tokens[k], n)
        writer.write(_serialize(example, ragged))
    shard_lengths.append(bounds[shard + 1] - bounds[shard])
    shard_bytes.append(int(tf.io.gfile.stat(path).length))
    logging.info("Wrote %s (%d examples)", path, shard_lengths[-1])
  features = {k: {"shape": [None] * task.output_features[k].rank,
                  "dtype": task.output_features[k].dtype.name} for k in keys}
  info = {"num_shards": num_shards, "features": features, "seqio_version": seqio.__version__,
          SAMTONE_KEY: {"task": task_name, "split": split,
                        "vocabularies": {k: vocabulary_fingerprint(
                            task.output_features[k].vocabulary) for k in keys},
                        "shard_lengths": shard_lengths, "shard_bytes": shard_bytes}}
  stats = {"examples": total, **{f"{k}_tokens": tokens[k] for k in keys},
           **{f"{k}_max_tokens": max_tokens[k] for k in keys}}
  with tf.io.gfile.GFile(seqio.get_cached_info_path(tmp_dir, split), "w") as f:
    json.dump(info, f, indent=2)
  with tf.io.gfile.GFile(seqio.get_cached_stats_path(tmp_dir, split), "w") as f:
    json.dump(stats, f, indent=2)
  with tf.io.gfile.GFile(os.path.join(tmp_dir, COMPLETED), "w") as f:
    f.write(f"{total} examples in {time.time() - start:.1f} s\n")
  tf.io.gfile.rename(tmp_dir, task_dir)
  return task_dir


def find_cache_dir(task: seqio.Task, cache_dirs: Sequence[str]) -> str:
  """The first `<dir>/<task>/` with a COMPLETED marker among `cache_dirs` and seqio's global
  cache directories (what `task.cache_dir` searches), or CacheError saying how to write one."""
  candidates = [task_cache_dir(d, task.name) for d in
                list(cache_dirs) + list(seqio.utils.get_global_cache_dirs())]
  for candidate in candidates:
    if tf.io.gfile.exists(os.path.join(candidate, COMPLETED)):
      return candidate
  raise CacheError(
      f"task {task.name!r}", None, "has no cache (a directory with a COMPLETED file) in "
      + (", ".join(candidates) if candidates else "any cache directory (none is set: "
         "TASK_CACHE_DIRS)") + ". " + CACHE_HELP.format(task=task.name))


def read_info(task_dir: str, split: str) -> dict[str, Any]:
  """info.<split>.json of a cache, or CacheError naming it."""
  path = seqio.get_cached_info_path(task_dir, split)
  if not tf.io.gfile.exists(path):
    raise CacheError(path, None, f"is missing: no split {split!r} in this cache.")
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError as e:
    raise CacheError(path, None, f"is not valid JSON ({e}; truncated?).") from None


def check_cache(task: seqio.Task, task_dir: str, split: str,
                shard_info: seqio.ShardInfo | None = None) -> list[str]:
  """Checks a cache against its task and its files; returns the shard paths in order.

  With `shard_info` (and at least as many shards as hosts) only that host's shards are sized
  (one stat per file: on gs:// a pod's hosts then share the work instead of each statting all).

  Raises:
    CacheError: naming the file: info.json of another task or vocabulary or without a feature the
      task needs, a missing, extra or truncated shard.
  """
  info_path = seqio.get_cached_info_path(task_dir, split)
  info = read_info(task_dir, split)
  num_shards = int(info.get("num_shards", 0))
  ours = info.get(SAMTONE_KEY)
  needed = [k for k in task.output_features if k in info.get("features", {})]
  missing = sorted(set(task.output_features) - set(info.get("features", {})))
  if missing:
    raise CacheError(info_path, None, f"has no feature {missing} that task {task.name!r} needs: "
                     "the cache is of another task. " + CACHE_HELP.format(task=task.name))
  if ours is not None:
    if ours.get("task") != task.name:
      raise CacheError(info_path, None, f"is a cache of task {ours.get('task')!r}, not "
                       f"{task.name!r}. " + CACHE_HELP.format(task=task.name))
    for key in needed:
      want = vocabulary_fingerprint(task.output_features[key].vocabulary)
      have = ours.get("vocabularies", {}).get(key)
      if have != want:
        raise CacheError(info_path, None, f"feature {key!r} was tokenised with vocabulary "
                         f"{have}, but task {task.name!r} uses {want}: the cached ids would be "
                         f"wrong. Rewrite it: samtone-cache-tasks --tasks={task.name} "
                         "--output_cache_dir=DIR --overwrite.")
  else:
    logging.warning("%s has no %r section (written by seqio's Beam pipeline?): the task name, "
                    "vocabulary and shard sizes cannot be checked.", info_path, SAMTONE_KEY)
  paths = [shard_path(task_dir, split, k, num_shards) for k in range(num_shards)]
  found = set(tf.io.gfile.glob(f"{seqio.get_cached_tfrecord_prefix(task_dir, split)}-*"))
  sizes = (ours or {}).get("shard_bytes")
  mine = set(range(num_shards))
  if shard_info is not None and num_shards >= shard_info.num_shards:
    mine = set(range(shard_info.index, num_shards, shard_info.num_shards))
  for k, path in enumerate(paths):
    if path not in found:
      raise CacheError(path, None, f"is missing: {info_path} lists {num_shards} shards. "
                       "Copy the whole cache directory again, or rewrite it.")
    if sizes is not None and k in mine:
      size = int(tf.io.gfile.stat(path).length)
      if size != sizes[k]:
        raise CacheError(path, None, f"has {size} bytes, {sizes[k]} when it was written "
                         "(truncated or replaced). Copy it again, or rewrite the cache.")
  extra = sorted(found - set(paths))
  if extra:
    raise CacheError(extra[0], None, f"is not one of the {num_shards} shards {info_path} lists "
                     "(a cache written twice into one directory?). Rewrite the cache.")
  return paths


def verify_records(paths: Sequence[str]) -> int:
  """Reads every record of `paths` (TFRecord CRCs checked); returns the count, or CacheError
  naming the first damaged file."""
  total = 0
  for path in paths:
    try:
      total += int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
    except tf.errors.DataLossError as e:
      raise CacheError(path, None, f"has a damaged record ({e.message.splitlines()[0]}). Copy "
                       "it again, or rewrite the cache.") from None
  return total



def verify_cache(task_name: str, cache_root: str, split: str = "train") -> int:
  """`check_cache` of `<cache_root>/<task_name>/`, then every record read (CRCs checked), and
  the record count compared with stats.<split>.json; returns the count.

  Raises:
    CacheError: naming the first file that is wrong.
  """
  task = seqio.get_mixture_or_task(task_name)
  task_dir = task_cache_dir(cache_root, task_name)
  if not tf.io.gfile.exists(os.path.join(task_dir, COMPLETED)):
    raise CacheError(os.path.join(task_dir, COMPLETED), None, "is missing: no complete cache "
                     "of this task there. " + CACHE_HELP.format(task=task_name))
  paths = check_cache(task, task_dir, split)
  count = verify_records(paths)
  stats_path = seqio.get_cached_stats_path(task_dir, split)
  with tf.io.gfile.GFile(stats_path) as f:
    expected = json.load(f).get("examples")
  if expected is not None and expected != count:
    raise CacheError(stats_path, None, f"counts {expected} examples, the shards hold {count}.")
  return count
