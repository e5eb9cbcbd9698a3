"""Cached tasks: the cache holds the uncached task's ids, hosts read disjoint files, resume is exact
and reads no consumed record, and a wrong or damaged cache is named.

References: the uncached pipeline (the Python readers + seqio tokenisation, tested against
SentencePiece in test_tasks_pipeline.py), seqio's own cached-task reader, and an uninterrupted run.
"""

import collections
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio

from samtone_jax import checkpoints
from samtone_jax import errors
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import trainer
from samtone_jax.models import config as model_config
from samtone_jax.tasks import beir
from samtone_jax.tasks import cache
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"queries": 6, "passages": 10}
WORDS = ["string", "file", "socket", "memory", "process", "pipe", "signal", "thread", "buffer"]
PAIRS = "cached_fixture_pairs"
NEGATIVES = "cached_fixture_negatives"
OTHER = "cached_fixture_other"
MIXTURE = "cached_fixture_mixture"
NUM_EXAMPLES = 40


def _examples(n, prefix, negatives):
  def generate():
    for i in range(n):
      # Long enough that trimming to LENGTHS cuts some texts (EOS convention exercised).
      example = {"queries": f"{prefix} {i} how to {WORDS[i % 9]}",
                 "passages": f"the {WORDS[i % 9]} {i} function copies {WORDS[(i * 7) % 9]} "
                             f"data from one {WORDS[(i + 4) % 9]} to another {prefix}"}
      if negatives:
        example["negatives"] = [f"unrelated {WORDS[(i + 2) % 9]} passage {i}"]
      yield example
  return generate


def _register(name, n, prefix, negatives=False, vocabulary=None):
  source = sources.examples_source({"train": _examples(n, prefix, negatives)},
                                   num_negatives=1 if negatives else 0)
  beir.register_pairs_task(name, source, vocabulary or vocab.demo_vocabulary(),
                           with_negatives=negatives, shuffle_buffer_size=16)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  _register(PAIRS, NUM_EXAMPLES, "query")
  _register(NEGATIVES, NUM_EXAMPLES, "question", negatives=True)
  _register(OTHER, 24, "other")
  seqio.MixtureRegistry.remove(MIXTURE)
  seqio.MixtureRegistry.add(MIXTURE, [(PAIRS, 3.0), (OTHER, 1.0)])
  root = str(tmp_path_factory.mktemp("seqio_cache"))
  cache.cache_task(PAIRS, root, num_shards=4)
  cache.cache_task(NEGATIVES, root, num_shards=3)
  cache.cache_task(OTHER, root, num_shards=2)
  return root


def _batches(name, n=None, *, batch_size=4, host=(0, 1), **kwargs):
  it = pipeline.get_train_iterator(name, LENGTHS, batch_size, seed=3,
                                   shard_info=seqio.ShardInfo(*host), **kwargs)
  if n is None:
    return list(it)
  return [next(it) for _ in range(n)]


def _assert_equal_batches(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", [PAIRS, NEGATIVES])
def test_cached_task_yields_the_uncached_examples_in_source_order(cache_root, name):
  uncached = _batches(name, batch_size=1, num_epochs=1, shuffle=False)
  cached = _batches(name, batch_size=1, num_epochs=1, shuffle=False, use_cached=True,
                    cache_dirs=[cache_root])
  assert len(uncached) == NUM_EXAMPLES
  _assert_equal_batches(uncached, cached)  # token ids, hard negatives and fingerprint ids

  # seqio's own cached-task reader reads the same ids: the layout is seqio's.
  task = seqio.get_mixture_or_task(name)
  seqio.add_global_cache_dirs([cache_root])
  try:
    task._cache_dir = None  # pylint: disable=protected-access  (seqio memoises the lookup)
    via_seqio = list(task.get_dataset(LENGTHS, split="train", use_cached=True, shuffle=False)
                     .as_numpy_iterator())
  finally:
    seqio.set_global_cache_dirs([])
    task._cache_dir = None  # pylint: disable=protected-access
  reference = list(task.get_dataset(LENGTHS, split="train", use_cached=False, shuffle=False)
                   .as_numpy_iterator())
  assert len(via_seqio) == len(reference) == NUM_EXAMPLES
  for a, b in zip(reference, via_seqio):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
  info = cache.read_info(cache.task_cache_dir(cache_root, name), "train")
  assert sum(info["samtone"]["shard_lengths"]) == NUM_EXAMPLES


def _rows(batches):
  return [tuple(row) for b in batches for row in b["queries"].tolist()]


def _file_rows(cache_root, name, shard_indices):
  """The queries of the given shards, in file order: the reference for a host's files."""
  rows = _rows(_batches(name, batch_size=1, num_epochs=1, shuffle=False, use_cached=True,
                        cache_dirs=[cache_root]))
  lengths = cache.read_info(cache.task_cache_dir(cache_root, name), "train")["samtone"][
      "shard_lengths"]
  starts = np.cumsum([0] + lengths)
  return [r for k in shard_indices for r in rows[starts[k]:starts[k + 1]]]


def test_two_hosts_read_disjoint_files_and_together_all_examples(cache_root):
  one = _rows(_batches(PAIRS, batch_size=1, num_epochs=1, shuffle=False, use_cached=True,
                       cache_dirs=[cache_root]))
  hosts = [_rows(_batches(PAIRS, batch_size=2, host=(h, 2), num_epochs=1, shuffle=False,
                          use_cached=True, cache_dirs=[cache_root])) for h in range(2)]
  # 4 files, 2 hosts: host h reads files h and h + 2, whole (file-level sharding).
  assert hosts[0] == _file_rows(cache_root, PAIRS, [0, 2])
  assert hosts[1] == _file_rows(cache_root, PAIRS, [1, 3])
  assert not set(hosts[0]) & set(hosts[1])
  assert collections.Counter(hosts[0] + hosts[1]) == collections.Counter(one)
  # Fewer files than hosts (2 files, 3 hosts): every host reads all, keeps example i % 3.
  other = _rows(_batches(OTHER, batch_size=1, num_epochs=1, shuffle=False, use_cached=True,
                         cache_dirs=[cache_root]))
  for h in range(3):
    rows = _rows(_batches(OTHER, batch_size=3, host=(h, 3), num_epochs=1, shuffle=False,
                          use_cached=True, cache_dirs=[cache_root]))
    assert rows == other[h::3]


@pytest.mark.parametrize("name", [NEGATIVES, MIXTURE])
def test_resume_restores_exact_batches_and_reads_no_consumed_record(cache_root, tmp_path, name):
  """Restoring at step 3 or step 400 reads the same few records; skipping would read 400 * 4."""
  total_steps = 8
  read_after_restore = {}
  for step in (3, 400):
    counts = collections.Counter()
    it = pipeline.get_train_iterator(name, LENGTHS, 4, seed=5, shard_info=seqio.ShardInfo(0, 1),
                                     use_cached=True, cache_dirs=[cache_root],
                                     record_counter=lambda: counts.update(["read"]))
    for _ in range(step):
      next(it)
    prefix = it.save(str(tmp_path / f"step{step}" / "input"))
    reference = [next(it) for _ in range(total_steps)]
    assert counts["read"] >= step * 4  # the uninterrupted run read them
    it.close()

    counts.clear()
    resumed = pipeline.get_train_iterator(
        name, LENGTHS, 4, seed=5, shard_info=seqio.ShardInfo(0, 1), use_cached=True,
        cache_dirs=[cache_root], record_counter=lambda: counts.update(["read"]))
    resumed.restore(prefix)
    _assert_equal_batches(reference, [next(resumed) for _ in range(total_steps)])
    read_after_restore[step] = counts["read"]
    resumed.close()
  # Independent of the step: at most the batches taken plus the read-ahead (one parse batch of
  # 256 records per task, the shuffle buffer refill and prefetch), never the 1,600 consumed.
  bound = total_steps * 4 + 2 * (pipeline._PARSE_BATCH + 16) + 64  # pylint: disable=protected-access
  assert read_after_restore[3] <= bound and read_after_restore[400] <= bound, read_after_restore
  assert 400 * 4 > 2 * bound


def test_uncached_examples_unchanged_by_the_cache_point():
  """The tasks' tokenise / trim+EOS split at seqio's cache point keeps the old single step's ids."""
  from samtone_jax.tasks import preprocessors  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  task_features = preprocessors.output_features(vocab.demo_vocabulary(), with_negatives=True)
  texts = {"queries": ["copy a string to another string buffer"],
           "passages": ["The strcpy function copies the string pointed to by src."],
           "negatives": [["close a file descriptor so that it no longer refers to any file"]]}
  ds = tf.data.Dataset.from_tensor_slices(texts)
  old = list(preprocessors.tokenize_trim_append_eos(ds, task_features, LENGTHS)
             .as_numpy_iterator())
  new = list(preprocessors.trim_append_eos(preprocessors.tokenize(ds, task_features),
                                           task_features, LENGTHS).as_numpy_iterator())
  for a, b in zip(old, new):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


# --- the trainer: kill at a late step and resume --------------------------------------------------

MODEL = model_config.DualEncoderConfig(
    encoder=model_config.T5Config(vocab_size=8000, d_model=32, d_ff=64, num_heads=2,
                                  num_layers=1, d_kv=16, dropout_rate=0.1),
    projection_dim=32, tower_sharing="sde")
TRAIN_LENGTHS = {"queries": 8, "passages": 16}


def _train(model_dir, name, cache_root, steps):
  return trainer.train(
      model_dir=model_dir, model=MODEL, loss=losses.LossConfig(temperature=0.05),
      optimizer=optimizers.OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=2,
                                           decay="linear", decay_steps=steps),
      data=trainer.DataConfig(mixture_or_task_name=name, task_feature_lengths=TRAIN_LENGTHS,
                              batch_size=8, use_cached=True, cache_dirs=(cache_root,)),
      loop=trainer.LoopConfig(train_steps=steps, log_period=100, checkpoint_period=3,
                              keep_checkpoints=10),
      seed=1)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("name", [PAIRS, MIXTURE])
def test_trainer_resumes_a_cached_run_bit_identically(cache_root, tmp_path, name):
  steps = 12  # 96 examples: past the first epoch of every task (40 and 24 examples)
  reference_dir = str(tmp_path / "reference")
  reference = _train(reference_dir, name, cache_root, steps)
  step_dir = os.path.join(checkpoints.checkpoint_dir(reference_dir), "9")
  manifest = checkpoints._walk_files(step_dir)  # pylint: disable=protected-access
  assert any(p.startswith("input/process_00000-of-00001") for p in manifest), manifest
  assert checkpoints.find_damage(step_dir) is None

  # "Killed" after the save at step 9: the run directory as it was then.
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(reference_dir, resumed_dir)
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(resumed_dir), "12"))
  resumed = _train(resumed_dir, name, cache_root, steps)
  assert int(resumed.state.step) == steps
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.params),
               _host(reference.state.params))

  if name == PAIRS:
    # Another host count: refused, naming both counts.
    for path in glob.glob(os.path.join(step_dir, "input", "*")):
      os.rename(path, path.replace("-of-00001", "-of-00002"))
    shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(reference_dir), "12"))
    os.remove(os.path.join(step_dir, checkpoints.FILES_MANIFEST))
    with pytest.raises(errors.CheckpointError, match="written by 2 processes, and this run has 1"):
      _train(reference_dir, name, cache_root, steps)


# --- bad input ------------------------------------------------------------------------------------


def _copy_cache(cache_root, tmp_path, name):
  root = str(tmp_path / "copy")
  shutil.copytree(cache.task_cache_dir(cache_root, name), cache.task_cache_dir(root, name))
  return root, cache.task_cache_dir(root, name)


def _read_cached(name, root):
  return next(pipeline.get_train_iterator(name, LENGTHS, 4, seed=0,
                                          shard_info=seqio.ShardInfo(0, 1), use_cached=True,
                                          cache_dirs=[root]))


def test_cache_of_another_task_or_vocabulary_is_refused(cache_root, tmp_path):
  root = str(tmp_path / "wrong")
  # The pairs cache put where the negatives task looks: no "negatives" feature.
  shutil.copytree(cache.task_cache_dir(cache_root, PAIRS), cache.task_cache_dir(root, NEGATIVES))
  info = seqio.get_cached_info_path(cache.task_cache_dir(root, NEGATIVES), "train")
  with pytest.raises(cache.CacheError, match=f"{info}: has no feature .*negatives.*another task"):
    _read_cached(NEGATIVES, root)
  # Same features, other task name.
  shutil.copytree(cache.task_cache_dir(cache_root, OTHER), cache.task_cache_dir(root, PAIRS))
  info = seqio.get_cached_info_path(cache.task_cache_dir(root, PAIRS), "train")
  with pytest.raises(cache.CacheError, match=f"{info}: is a cache of task '{OTHER}'"):
    _read_cached(PAIRS, root)
  # The right task, registered again with another vocabulary.
  _register("cached_fixture_bytes", 8, "bytes")
  cache.cache_task("cached_fixture_bytes", root, num_shards=1)
  _register("cached_fixture_bytes", 8, "bytes", vocabulary=seqio.ByteVocabulary())
  info = seqio.get_cached_info_path(cache.task_cache_dir(root, "cached_fixture_bytes"), "train")
  with pytest.raises(cache.CacheError, match=f"{info}: feature '(queries|passages)' was "
                     "tokenised with vocabulary .*SentencePieceVocabulary.*ByteVocabulary"):
    _read_cached("cached_fixture_bytes", root)
  with pytest.raises(cache.CacheError, match="has no cache .*Write the cache with `samtone-cache-tasks"):
    _read_cached(PAIRS, str(tmp_path / "empty"))


def test_missing_and_truncated_shards_are_named(cache_root, tmp_path):
  root, task_dir = _copy_cache(cache_root, tmp_path, PAIRS)
  shard = cache.shard_path(task_dir, "train", 2, 4)
  with open(shard, "rb") as f:
    data = f.read()
  os.remove(shard)
  with pytest.raises(cache.CacheError, match=f"{shard}: is missing"):
    _read_cached(PAIRS, root)
  with open(shard, "wb") as f:
    f.write(data[:-7])
  with pytest.raises(cache.CacheError, match=f"{shard}: has {len(data) - 7} bytes, {len(data)} "
                     "when it was written"):
    _read_cached(PAIRS, root)
  # A cache without our shard sizes (as seqio's Beam pipeline writes it): the truncated record is
  # found while reading, and named.
  info_path = seqio.get_cached_info_path(task_dir, "train")
  with open(info_path) as f:
    info = json.load(f)
  del info["samtone"]
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(cache.CacheError, match=f"{shard}: has a damaged record"):
    list(pipeline.get_train_iterator(PAIRS, LENGTHS, 4, seed=0, shard_info=seqio.ShardInfo(0, 1),
                                     use_cached=True, cache_dirs=[root], num_epochs=1))


def test_command_writes_verifies_and_exits_non_zero_on_a_bad_cache(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  root = str(tmp_path / "cli")
  command = [sys.executable, "-m", "samtone_jax.cache_tasks", "--tasks=demo_manpages",
             f"--output_cache_dir={root}", "--num_shards=2"]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  task_dir = cache.task_cache_dir(root, "demo_manpages")
  assert "Wrote demo_manpages (train) to" in result.stdout
  assert sorted(os.listdir(task_dir)) == [
      "COMPLETED", "info.train.json", "stats.train.json", "train.tfrecord-00000-of-00002",
      "train.tfrecord-00001-of-00002"]
  # Again: the cache exists; nothing is replaced without --overwrite.
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 1
  assert f"{task_dir}: exists already; pass --overwrite" in result.stderr
  # --verify of a damaged shard: the file is named, status 1.
  shard = cache.shard_path(task_dir, "train", 1, 2)
  with open(shard, "r+b") as f:
    f.seek(100)
    f.write(b"\xff\xff\xff\xff")
  result = subprocess.run(command + ["--verify"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
  assert result.returncode == 1
  assert f"{shard}: has a damaged record" in result.stderr, result.stderr[-2000:]


def _damage_cache(task_dir, kind):
  """Damages a copy of a 2-shard cache as the issue lists; returns (file, expected message)."""
  info_path = seqio.get_cached_info_path(task_dir, "train")
  with open(info_path) as f:
    info = json.load(f)
  if kind == "another_task":  # a cache copied in under the wrong task's name
    info["samtone"]["task"] = "msmarco_passage_train"
    expected = f"{info_path}: is a cache of task 'msmarco_passage_train', not 'demo_manpages'"
  elif kind == "another_vocabulary":  # tokenised with another SentencePiece model
    info["samtone"]["vocabularies"]["passages"]["sha256"] = "0" * 64
    expected = f"{info_path}: feature 'passages' was tokenised with vocabulary"
  elif kind == "missing_shard":
    shard = cache.shard_path(task_dir, "train", 1, 2)
    os.remove(shard)
    return shard, f"{shard}: is missing: {info_path} lists 2 shards"
  else:  # a truncated shard: its last record cut short
    shard = cache.shard_path(task_dir, "train", 0, 2)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
      f.truncate(size - 7)
    return shard, f"{shard}: has {size - 7} bytes, {size} when it was written"
  with open(info_path, "w") as f:
    json.dump(info, f)
  return info_path, expected


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
  """A 2-shard cache of the demo task (registered as the training command registers it)."""
  from samtone_jax.tasks import all as _  # pylint: disable=g-import-not-at-top,unused-import
  root = str(tmp_path_factory.mktemp("demo_cache"))
  cache.cache_task("demo_manpages", root, num_shards=2)
  return root


@pytest.mark.parametrize("kind", ["another_task", "another_vocabulary", "missing_shard",
                                  "truncated_shard"])
def test_training_command_names_a_wrong_or_damaged_cache_and_exits_1(demo_cache, tmp_path, kind):
  """`samtone_jax.main` with USE_CACHED_TASKS on each bad cache of the issue: one message naming
  the file, status 1, no traceback, and nothing written to MODEL_DIR (checked before compiling)."""
  root = str(tmp_path / "cache")
  shutil.copytree(demo_cache, root)
  path, expected = _damage_cache(cache.task_cache_dir(root, "demo_manpages"), kind)
  model_dir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "samtone_jax.main", "--gin_file=experiments/demo_samtone.gin",
       f"--gin.MODEL_DIR='{model_dir}'", "--gin.USE_CACHED_TASKS=True",
       f"--gin.TASK_CACHE_DIRS=['{root}']", "--gin.TRAIN_STEPS=2", "--gin.EVAL_TASKS=[]"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 1, done.stderr[-3000:]
  assert expected in done.stderr, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert not model_dir.exists()  # no lock, no config.gin, no checkpoint


# --- two processes (jax.distributed): each saves its own input state; resume is exact -----------

TWO_PROCESS_TASKS_MODULE = '''
from samtone_jax.tasks import all as _all  # the demo vocabulary and the rest
from samtone_jax.tasks import beir, sources, vocab

def _examples():
  for i in range(64):
    yield {"queries": f"query {i} how to copy a string number {i % 7}",
           "passages": f"the function {i} copies the string {i % 5} to a buffer of size {i}"}

beir.register_pairs_task("cached_two_process", sources.examples_source({"train": _examples}),
                         vocab.demo_vocabulary(), shuffle_buffer_size=16)
'''


def test_two_processes_save_their_input_states_and_resume_exactly(tmp_path, monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top
  from test_multihost import checkpoint_params, free_port, run_processes  # pylint: disable=g-import-not-at-top
  (tmp_path / "two_process_tasks.py").write_text(TWO_PROCESS_TASKS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.import_module("two_process_tasks")
  root = str(tmp_path / "cache")
  cache.cache_task("cached_two_process", root, num_shards=4)

  def run(model_dir):
    address = f"localhost:{free_port()}"
    command = lambda i: [
        sys.executable, "-m", "samtone_jax.main", "--gin_file=experiments/demo_samtone.gin",
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='cached_two_process'",
        "--gin.trainer.DataConfig.tasks_module='two_process_tasks'",
        "--gin.USE_CACHED_TASKS=True", f"--gin.TASK_CACHE_DIRS=['{root}']",
        "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=16", "--gin.EVAL_TASKS=[]",
        "--gin.TASK_FEATURE_LENGTHS={'queries': 8, 'passages': 16}",
        "--gin.config.T5Config.num_layers=1", "--gin.trainer.LoopConfig.checkpoint_period=3",
        f"--coordinator_address={address}", "--process_count=2", f"--process_index={i}"]
    # A shared compilation cache: the resumed run reuses the reference run's programs.
    return run_processes([command(0), command(1)], num_devices=4,
                         extra_env={"PYTHONPATH": f"{tmp_path}:{REPO}",
                                    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
                                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

  reference = tmp_path / "reference"
  assert all("Finished at step 6" in out for out in run(reference))
  for step in (3, 6):
    step_dir = os.path.join(checkpoints.checkpoint_dir(str(reference)), str(step))
    with open(os.path.join(step_dir, checkpoints.FILES_MANIFEST)) as f:
      listed = json.load(f)
    for host in range(2):  # each host wrote its own state, before process 0's manifest
      assert any(p.startswith(f"input/process_{host:05d}-of-00002.") for p in listed), listed
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(str(resumed)), "6"))
  outputs = run(resumed)
  assert all("Resuming from checkpoint step 3" in out for out in outputs)
  jax.tree.map(np.testing.assert_array_equal, checkpoint_params(resumed, 6),
               checkpoint_params(reference, 6))
