"""The training loop: input stream, jitted step, metrics, evaluation, checkpoints, preemption.

`train(...)` is what `python -m samtone_jax.main` runs (gin binds its arguments from
`gin/runs/*.gin` and `gin/experiments/*.gin`); it is a plain function that a notebook or a test can
call directly. One run directory (`model_dir`) holds:

  checkpoints/<step>/   orbax checkpoints (see checkpoints.py); a restart resumes from the latest
  metrics.jsonl         one JSON object per log / eval event
  train/, eval/         TensorBoard event files (clu metric_writers)
  config.gin            the operative gin config (written by `train`; see `config_text_of`)

Resuming restores the step, the parameters and optimizer state; the dropout key of a step is
`fold_in(jax.random.key(seed, impl=prng_impl), step)` (PRNG_IMPL; parameters are initialised from
`train_step.init_key(seed)`) and the input stream restarts at the step (`start_step`), so a run
that is killed and resumed ends with exactly the parameters of an uninterrupted run.

SIGTERM (TPU preemption) makes the loop save a checkpoint after the current step and return; with
several processes, every host stops at the same step (JAX's preemption sync point). A
non-finite loss raises `NonFiniteLossError` naming the step and the last good checkpoint; no
checkpoint is ever written after a non-finite loss.

Before anything is compiled, `train` checks the configuration (`check_config`: batch size, lengths,
periods, the task and eval sets exist, the vocabulary exists and fits `T5Config.vocab_size`),
takes the run directory's lock (`run_lock`: a second trainer on the same MODEL_DIR is refused),
checks that TRAIN_STEPS is not below the checkpointed step and that the newest checkpoint is
intact, and reads the first batch (so bad or empty data is reported within seconds). Only then is
`config.gin` written and the model built. A damaged checkpoint stops the run naming the step,
the file and the newest intact step; `LoopConfig.resume_fallback=True` resumes from that step.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import difflib
import functools
import importlib
import itertools
import json
import os
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio

from samtone_jax import checkpoints
from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax import losses
from samtone_jax import model_kinds
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import run_lock
from samtone_jax import train_step as train_step_lib
from samtone_jax.evaluation import encoding

PyTree = Any


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The training loss became NaN or infinite (a configuration or data problem to fix)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training input.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: {"queries": Lq, "passages": Lp} (TASK_FEATURE_LENGTHS).
    batch_size: global batch size (BATCH_SIZE), summed over all hosts. How many hard negatives
      a batch holds per query is the task's (`num_negatives`), never bound.
    split: the training split.
    tasks_module: the module whose import registers the tasks.
    use_cached: read the tasks' caches written by `samtone-cache-tasks` (USE_CACHED_TASKS): each
      host reads its own files, parsed in the TF graph, and a resume restores each host's
      iterator state from the checkpoint in constant time (same host count only). See
      `tasks/pipeline.py`.
    cache_dirs: directories holding `<task name>/` caches (TASK_CACHE_DIRS), searched before
      seqio's global cache directories.
  """

  mixture_or_task_name: str
  task_feature_lengths: dict[str, int]
  batch_size: int
  split: str = "train"
  tasks_module: str = "samtone_jax.tasks.all"
  use_cached: bool = False
  cache_dirs: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Length of the run and how often it logs, evaluates and checkpoints.

  Attributes:
    train_steps: total optimizer steps (TRAIN_STEPS).
    log_period: write training metrics every this many steps.
    checkpoint_period: save every this many steps (and at the end).
    keep_checkpoints: keep the latest this many.
    eval_period: evaluate every this many steps (0: only at the end; needs eval_sets).
    eval_sets: names of registered evaluation sets (EVAL_TASKS); empty: no evaluation.
    eval_metrics: metric names for the eval sets (e.g. ("mrr@10", "ndcg@10")); empty: each
      set's protocol defaults.
    eval_feature_lengths: {"queries": Lq, "passages": Lp} to truncate the eval sets' queries and
      documents to (e.g. TASK_FEATURE_LENGTHS); None: each set's own lengths.
    eval_ignore_identical_ids: drop a retrieved document whose id equals the query id
      (EVAL_IGNORE_IDENTICAL_IDS); None: each set's protocol decides (on for BEIR sets).
    eval_embeddings_dir: stream each eval set's corpus embeddings to shards under
      `<dir>/<eval set>/` and search them from disk (EVAL_EMBEDDINGS_DIR); None: in memory.
    eval_embedding_dtype: "float32" or "bfloat16", how corpus embeddings are stored
      (EVAL_EMBEDDING_DTYPE).
    best_metric: also keep the checkpoint with the best value of this eval metric, e.g.
      "demo_manpages_test/mrr@10" (checkpoint_period should divide eval_period).
    best_mode: "max" or "min".
    resume_fallback: when the newest checkpoint is damaged, resume from the newest intact one
      (deleting the damaged ones) instead of stopping with an error naming it.
  """

  train_steps: int
  log_period: int = 100
  checkpoint_period: int = 1000
  keep_checkpoints: int = 3
  eval_period: int = 0
  eval_sets: Sequence[str] = ()
  eval_metrics: Sequence[str] = ()
  eval_feature_lengths: dict[str, int] | None = None
  eval_ignore_identical_ids: bool | None = None
  eval_embeddings_dir: str | None = None
  eval_embedding_dtype: str = "float32"
  best_metric: str | None = None
  best_mode: str = "max"
  resume_fallback: bool = False


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the final state, the last training and eval metrics."""

  state: train_step_lib.TrainState
  built: train_step_lib.Built
  mesh: jax.sharding.Mesh
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  preempted: bool = False


class _PreemptionFlag:
  """Decides at each step boundary whether to checkpoint and stop for a preemption (SIGTERM).

  One process: our own SIGTERM handler sets a flag, read at the next step boundary.

  Several processes (a pod): hosts can get SIGTERM at different steps, and one host leaving
  the loop for the (collective) checkpoint save while the others enter the next (collective)
  train step would hang them all. So there every host asks JAX's preemption sync manager
  (`multihost_utils.reached_preemption_sync_point`), which returns True on all hosts at the same
  step once any host got the notice. Its SIGTERM notifier is a C handler installed by
  `jax.distributed.initialize`; we install no Python handler then, as it would replace that one.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = False
    self._sync_service = False

  def __enter__(self):
    if jax.process_count() > 1:
      # Without the service JAX installs no notifier and reached_preemption_sync_point raises;
      # a per-host flag of ours would hang the pod, so SIGTERM just ends the process then.
      self._sync_service = bool(jax.config.jax_enable_preemption_service)
      self._multiprocess = True
      if not self._sync_service:
        logging.warning("jax_enable_preemption_service is off: this multi-process run will not "
                        "checkpoint on preemption (SIGTERM).")
      return self
    def handler(signum, frame):
      del frame
      logging.warning("Signal %d received: checkpointing and stopping.", signum)
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop; with several processes, the same on every host.

    Multi-process runs must call this at every step (the sync protocol counts on it).
    """
    if self._multiprocess:
      if (not self.requested and self._sync_service
          and multihost_utils.reached_preemption_sync_point(step)):
        logging.warning("Preemption sync point reached at step %d on all hosts: checkpointing "
                        "and stopping.", step)
        self.requested = True
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def summarize_metrics(step_metrics: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  """Host-side division of summed metrics over a window of steps.

  Returns:
    loss (mean per example), accuracy (query top-1 in-batch; the encoder-decoder's: argmax
    target-token accuracy), document_accuracy (when bidirectional), grad_norm (mean over steps), learning_rate and temperature (last step).
  """
  total = {k: float(sum(float(m[k]) for m in step_metrics)) for k in step_metrics[0]}
  examples = max(total["num_examples"], 1.0)
  if "token_correct" in total:  # the encoder-decoder: token accuracy, no temperature
    return {"loss": total["loss_sum"] / examples,
            "accuracy": total["token_correct"] / max(total["num_tokens"], 1.0),
            "grad_norm": total["grad_norm"] / len(step_metrics),
            "learning_rate": float(step_metrics[-1]["learning_rate"])}
  out = {"loss": total["loss_sum"] / examples,
         "accuracy": total["query_top1_correct"] / examples,
         "grad_norm": total["grad_norm"] / len(step_metrics),
         "learning_rate": float(step_metrics[-1]["learning_rate"]),
         "temperature": float(step_metrics[-1]["temperature"])}
  if "document_top1_correct" in total:
    out["document_accuracy"] = total["document_top1_correct"] / examples
  return out


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _MetricsLog:
  """TensorBoard (clu) + metrics.jsonl + stdout, written by process 0 only."""

  def __init__(self, model_dir: str):
    self.chief = jax.process_index() == 0
    self.writers = {
        "train": metric_writers.create_default_writer(
            os.path.join(model_dir, "train"), just_logging=not self.chief, asynchronous=False),
        "eval": metric_writers.create_default_writer(
            os.path.join(model_dir, "eval"), just_logging=not self.chief, asynchronous=False)}
    self.jsonl_path = os.path.join(model_dir, "metrics.jsonl")

  def write(self, kind: str, step: int, metrics: dict[str, float]) -> None:
    self.writers[kind].write_scalars(step, metrics)
    self.writers[kind].flush()
    if self.chief:
      with io_utils.open_file(self.jsonl_path, "a") as f:
        f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")

  def close(self):
    for writer in self.writers.values():
      writer.close()


def input_iterator(data: DataConfig, seed: int, start_step: int,
                   step_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This host's slice of the deterministic training stream, starting at `start_step`.

  Cached tasks (`data.use_cached`): a `pipeline.InputIterator` restored from this host's input
  state in `step_dir` (the checkpoint of `start_step`; needed when start_step > 0).

  Raises:
    errors.CheckpointError: the checkpoint has no input state for this process count.
  """
  from samtone_jax.tasks import pipeline  # pylint: disable=g-import-not-at-top
  shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
  if not data.use_cached:
    return pipeline.get_train_iterator(
        data.mixture_or_task_name, dict(data.task_feature_lengths), data.batch_size, seed=seed,
        start_step=start_step, shard_info=shard_info, split=data.split)
  batches = pipeline.get_train_iterator(
      data.mixture_or_task_name, dict(data.task_feature_lengths), data.batch_size, seed=seed,
      shard_info=shard_info, split=data.split, use_cached=True, cache_dirs=tuple(data.cache_dirs))
  if start_step:
    prefix = checkpoints.input_state_prefix(step_dir, shard_info.index, shard_info.num_shards)
    if not io_utils.exists(prefix + ".index"):
      counts = checkpoints.input_state_process_counts(step_dir)
      if counts:
        problem = (f"was written by {counts[-1]} processes, and this run has "
                   f"{shard_info.num_shards}: a cached run keeps one input position per host and "
                   f"resumes only with the same host count. Resume with {counts[-1]} processes, "
                   "or start a new MODEL_DIR (INITIAL_CHECKPOINT_PATH can take its parameters).")
      else:
        problem = ("has no input state: it was written with USE_CACHED_TASKS=False (resume "
                   "with that, or start a new MODEL_DIR), or its save was interrupted (delete "
                   "this step directory to resume from the one before).")
      raise errors.CheckpointError(f"Checkpoint {step_dir} (step {start_step}) {problem} "
                                   f"Expected {prefix}.index.")
    batches.restore(prefix)
  return batches


def _positive_int(value: Any, binding: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise errors.ConfigError(f"{binding} = {value!r}: expected a positive integer.")


def check_config(model: Any, loss: losses.LossConfig,
                 data: DataConfig, loop: LoopConfig, mesh: jax.sharding.Mesh,
                 chunks: train_step_lib.ChunkConfig = train_step_lib.ChunkConfig()) -> None:
  """Checks what can be checked before a model is built; reads only the vocabulary files.

  Raises:
    errors.ConfigError: a binding is out of range or inconsistent; the message names it.
    readers.MissingDataError: the task's vocabulary file is missing or unreachable.
  """
  from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top
  _positive_int(data.batch_size, "BATCH_SIZE (trainer.DataConfig.batch_size)")
  data_parallel = mesh.shape[partitioning.DATA_AXIS]
  if data.batch_size % data_parallel:
    raise errors.ConfigError(
        f"BATCH_SIZE = {data.batch_size} is not divisible by the mesh's data axis "
        f"({data_parallel} = {jax.device_count()} devices / model axis "
        f"{mesh.shape[partitioning.MODEL_AXIS]}): use a multiple of {data_parallel}.")
  try:
    chunks.check(data.batch_size, data_parallel)
    model_kinds.of(model).check_options(loss=loss, chunks=chunks, loop=loop)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  lengths = dict(data.task_feature_lengths)
  for key in model_kinds.of(model).feature_keys:
    if key not in lengths:
      raise errors.ConfigError(f"TASK_FEATURE_LENGTHS = {lengths!r} has no {key!r} length.")
    _positive_int(lengths[key], f"TASK_FEATURE_LENGTHS[{key!r}]")
  if isinstance(loop.train_steps, bool) or not isinstance(loop.train_steps, (int, np.integer)) or (
      loop.train_steps < 0):
    raise errors.ConfigError(f"TRAIN_STEPS (trainer.LoopConfig.train_steps) = "
                             f"{loop.train_steps!r}: expected 0 or more steps.")
  for field in ("log_period", "checkpoint_period", "keep_checkpoints"):
    _positive_int(getattr(loop, field), f"trainer.LoopConfig.{field}")
  if loop.eval_period < 0:
    raise errors.ConfigError(f"EVAL_PERIOD = {loop.eval_period}: expected 0 (only at the end) "
                             "or a positive number of steps.")
  try:
    provider = seqio.get_mixture_or_task(data.mixture_or_task_name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(str(data.mixture_or_task_name), known, n=3)
    raise errors.ConfigError(
        f"MIXTURE_OR_TASK_NAME = {data.mixture_or_task_name!r} is not a registered seqio task "
        f"or mixture" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else
                         f"; registered: {', '.join(known)}") +
        " (BEIR directories under $SAMTONE_DATA_DIR/beir/<name>/ register beir_<name>_train "
        "when they have qrels/train.tsv).") from None
  kind = model_kinds.of(model)
  kind.check_eval_sets(loop.eval_sets)
  encoding.embedding_dtype(loop.eval_embedding_dtype,
                           "EVAL_EMBEDDING_DTYPE (trainer.LoopConfig.eval_embedding_dtype)")
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    for feature in task.output_features.values():
      vocab.check_fits(feature.vocabulary, kind.vocab_size, f"task {task.name!r}")
  if data.use_cached:
    # A missing cache, one of another task or vocabulary, or a missing / truncated shard is
    # named here, before anything is compiled.
    from samtone_jax.tasks import cache  # pylint: disable=g-import-not-at-top
    shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    for task in tasks:
      cache.check_cache(task, cache.find_cache_dir(task, data.cache_dirs), data.split, shard_info)
  if model_kinds.is_seq2seq(model):
    return  # its loss is the model's (Seq2SeqLossConfig): no contrastive features to check
  try:
    for task in tasks:
      loss.check_features(task.output_features, f"task {task.name!r}")
    num_negatives(data, loss)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def num_negatives(data: DataConfig, loss: losses.LossConfig) -> int:
  """Hard negatives per query in the step's batches: the task's (see `pipeline.num_negatives`)
  when the loss uses them, else 0 (the feature is then not sent to the devices)."""
  if not loss.use_hard_negatives:
    return 0
  from samtone_jax.tasks import pipeline  # pylint: disable=g-import-not-at-top
  importlib.import_module(data.tasks_module)  # registers the task
  return pipeline.num_negatives(data.mixture_or_task_name, data.split)


def write_config(model_dir: str, config_text: str) -> str:
  """Writes the gin config to MODEL_DIR/config.gin (process 0; gs:// too); returns the path."""
  path = os.path.join(model_dir, "config.gin")
  if jax.process_index() == 0:
    io_utils.makedirs(model_dir)
    with io_utils.open_file(path, "w") as f:
      f.write(config_text)
  return path


def config_text_of(arguments: dict[str, Any]) -> str:
  """The text of MODEL_DIR/config.gin for a `train` call with `arguments`.

  The operative gin config (`gin.config_str()`) when gin bound `train` (the commands,
  `gin_config.run_from_gin`); otherwise, e.g. `train(...)` called from a notebook with
  dataclasses, the arguments themselves, as gin comments (so the file still parses).
  """
  import gin  # pylint: disable=g-import-not-at-top  (read only to record the run's config)
  try:
    configured = bool(gin.get_bindings(train))
  except ValueError:  # no gin file imported samtone_jax.trainer
    configured = False
  if configured:
    return gin.config_str()
  lines = ["# trainer.train was called directly, not through gin; its arguments:"]
  lines += [f"#   {name} = {value!r}" for name, value in arguments.items()]
  return "\n".join(lines) + "\n"


def _first_batch(batches: Iterator[dict[str, np.ndarray]], data: DataConfig
                 ) -> dict[str, np.ndarray]:
  """The first batch, or a DataFormatError saying why the task is empty."""
  from samtone_jax.tasks import readers  # pylint: disable=g-import-not-at-top
  try:
    return next(batches)
  except StopIteration:
    raise readers.DataFormatError(
        f"task {data.mixture_or_task_name!r} (split {data.split!r})", None,
        f"yields no batch of {data.batch_size} examples: the task's files hold fewer usable "
        "training examples than one batch (empty files, or no relevant judgement). Check the "
        "task's data, or lower BATCH_SIZE.") from None


def initial_state(built: train_step_lib.Built, seed: int, model_config,
                  initial_checkpoint_path: str | None) -> train_step_lib.TrainState:
  """A fresh sharded state; its params replaced by those of `initial_checkpoint_path` if given."""
  state = built.init_state(train_step_lib.init_key(seed))
  if initial_checkpoint_path:
    params = checkpoints.load_initial_params(initial_checkpoint_path, state.params, model_config)
    # The optimizer state was initialised for the same shapes; only values change.
    state = state.replace(params=params)
  return state


def train(*, model_dir: str, model: Any,
          loss: losses.LossConfig = losses.LossConfig(),
          optimizer: optimizers.OptimizerConfig, data: DataConfig, loop: LoopConfig, seed: int = 0,
          mesh_shape: tuple[int, int] = (-1, 1),
          initial_checkpoint_path: str | None = None,
          config_text: str | None = None,
          chunks: train_step_lib.ChunkConfig = train_step_lib.ChunkConfig(),
          prng_impl: str = train_step_lib.DEFAULT_PRNG_IMPL) -> TrainResult:
  """Trains a model; resumes from `model_dir`'s latest checkpoint if there is one.

  Args:
    model_dir: run directory (MODEL_DIR).
    model: the dual encoder architecture, or a `seq2seq_model.EncoderDecoderModel` (SKILL; its
      loss is its own, TASK_FEATURE_LENGTHS are {"inputs", "targets"}, EVAL_TASKS are QA tasks
      "TASK[:SPLIT]" scored by exact match). `model_kinds` tells them apart.
    loss: the contrastive loss (dual encoder only).
    optimizer: optimizer and learning-rate schedule.
    data: the training input.
    loop: steps, logging, evaluation and checkpoint periods.
    seed: parameter init, dropout and data order.
    mesh_shape: (data, model) mesh sizes; -1 fills with the remaining devices.
    initial_checkpoint_path: parameters to start from when `model_dir` has no checkpoint: a
      samtone_jax checkpoint (params only) or public T5 / GTR weights (INITIAL_CHECKPOINT_PATH).
    config_text: what MODEL_DIR/config.gin holds, written once the configuration and the first
      batch are checked. None (the commands, `gin_config.run_from_gin`, a notebook): the
      operative gin config when gin bound this call, else this call's arguments (`config_text_of`).
    chunks: gradient caching and loss row chunking for huge batches (EMBEDDING_CHUNK_SIZE,
      LOSS_CHUNK_SIZE); the same update as without.
    prng_impl: the PRNG implementation of the dropout keys (PRNG_IMPL): "threefry2x32"
      (default; see train_step.DEFAULT_PRNG_IMPL for why), "rbg" or "unsafe_rbg".

  Returns:
    A TrainResult.

  Raises:
    errors.ConfigError: a binding is out of range, or TRAIN_STEPS is below the checkpointed step.
    errors.RunDirectoryLockedError: another trainer is using `model_dir`.
    errors.CheckpointError: the newest checkpoint is damaged (and `loop.resume_fallback` is off,
      or no earlier step is intact) or does not fit `model`.
    readers.DataFormatError / MissingDataError: bad, empty or missing training data.
    NonFiniteLossError: the loss became NaN/inf; the message names the step and the last good
      checkpoint.
  """
  if config_text is None:
    config_text = config_text_of(dict(
        model_dir=model_dir, model=model, loss=loss, optimizer=optimizer, data=data, loop=loop,
        seed=seed, mesh_shape=mesh_shape, initial_checkpoint_path=initial_checkpoint_path,
        chunks=chunks, prng_impl=prng_impl))
  importlib.import_module(data.tasks_module)  # registers the tasks and evaluation sets
  try:
    mesh = partitioning.create_mesh(*mesh_shape)
  except ValueError as e:
    raise errors.ConfigError(f"trainer.train.mesh_shape = {tuple(mesh_shape)}: {e}") from None
  try:
    train_step_lib.check_prng_impl(prng_impl)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  check_config(model, loss, data, loop, mesh, chunks)
  # From the start: a preemption during set-up (compilation, restore) also ends cleanly.
  with run_lock.hold(model_dir, enabled=jax.process_index() == 0), _PreemptionFlag() as preemption:
    return _train(preemption, mesh, model_dir=model_dir, model=model, loss=loss,
                  optimizer=optimizer, data=data, loop=loop, seed=seed,
                  initial_checkpoint_path=initial_checkpoint_path, config_text=config_text,
                  chunks=chunks, prng_impl=prng_impl)


def _close(batches: Iterator[Any]) -> None:
  """Shuts the input pipeline down now, from this thread.

  A tf.data iterator left to the garbage collector may be destroyed at interpreter exit, when its
  background threads can no longer take the GIL, and the process hangs; closing the generator
  destroys it while the interpreter is fully alive.
  """
  close = getattr(batches, "close", None)
  if close is not None:
    close()


def _train(preemption: _PreemptionFlag, mesh: jax.sharding.Mesh, *, model_dir, model, loss,
           optimizer, data, loop, seed, initial_checkpoint_path, config_text,
           chunks, prng_impl) -> TrainResult:
  """`train`'s body, with the run directory locked and the SIGTERM flag installed."""
  latest = checkpoints.latest_step_in(model_dir)
  if latest is not None and latest > loop.train_steps:
    raise errors.ConfigError(
        f"TRAIN_STEPS = {loop.train_steps}, but {model_dir} already has a checkpoint at step "
        f"{latest}: raise TRAIN_STEPS to at least {latest} to continue that run, or use a new "
        "MODEL_DIR.")
  resume_step = None
  if latest is not None:
    # Before anything is built: a damaged newest checkpoint stops the run (naming the step, the
    # file and the newest intact step) or, with resume_fallback, moves the resume step back.
    resume_step = checkpoints.choose_resume_step(model_dir, fallback=loop.resume_fallback)
  start_step = resume_step or 0
  if latest is not None and latest == loop.train_steps and resume_step == latest:
    print(f"The run in {model_dir} is already complete: its checkpoint is at step {latest} = "
          "TRAIN_STEPS. Nothing to train; raise TRAIN_STEPS to continue it.", flush=True)

  step_dir = (os.path.join(checkpoints.checkpoint_dir(model_dir), str(start_step))
              if start_step else None)
  batches = source = input_iterator(data, seed, start_step, step_dir)
  try:
    first = _first_batch(batches, data)
    batches = itertools.chain([first], batches)
    write_config(model_dir, config_text)
    return _train_loop(preemption, mesh, batches, start_step, resume_step, model_dir=model_dir,
                       model=model, loss=loss, optimizer=optimizer, data=data, loop=loop,
                       seed=seed, initial_checkpoint_path=initial_checkpoint_path, chunks=chunks,
                       input_state=source if data.use_cached else None, prng_impl=prng_impl)
  finally:
    _close(batches)
    _close(source)


class _LoopSteps:
  """The named steps of the training loop (`_train_loop`) and what they share between steps: the
  window of device metrics since the last flush and the step of the last checkpoint.

  Progress and ETA are printed here rather than by clu's `periodic_actions.ReportProgress`: that
  logs through absl at INFO (the commands log at WARNING) and reports steps/s alone, while this
  line carries the loss, accuracy and throughput of the same window, from metrics that `flush`
  fetches anyway.
  """

  def __init__(self, built: train_step_lib.Built, kind: Any, manager: Any, mesh: jax.sharding.Mesh, *,
               model_dir: str, data: DataConfig, loop: LoopConfig, seed: int,
               last_saved: int | None, prng_impl: str = train_step_lib.DEFAULT_PRNG_IMPL,
               input_state: Any = None):
    self.built, self.manager, self.mesh = built, manager, mesh
    self.kind = kind  # model_kinds.of(model): how this model is evaluated
    self.prng_impl = prng_impl
    self.input_state = input_state  # the cached pipeline's iterator (None: uncached)
    self.model_dir, self.data, self.loop, self.seed = model_dir, data, loop, seed
    self.last_saved = last_saved
    self.last_summary: dict[str, float] = {}
    self.log = _MetricsLog(model_dir)
    self.window: list[tuple[int, PyTree]] = []  # (step, device metrics) since the last flush
    self.window_start = time.time()
    # Eval sets are parsed at the first evaluation and reused by the later ones of this run.
    self.eval_set_cache: dict[str, Any] = {}

  def is_log_step(self, step: int) -> bool:
    return step % self.loop.log_period == 0 or step == self.loop.train_steps

  def is_eval_step(self, step: int) -> bool:
    return bool(self.loop.eval_sets) and (
        step == self.loop.train_steps or bool(self.loop.eval_period
                                              and step % self.loop.eval_period == 0))

  def is_checkpoint_step(self, step: int) -> bool:
    return step % self.loop.checkpoint_period == 0 or step == self.loop.train_steps

  def train(self, state: train_step_lib.TrainState, step: int,
            local_batch: dict[str, np.ndarray], rng: jax.Array) -> train_step_lib.TrainState:
    """Input and step: this host's batch as a global one, one optimizer step; its (device)
    metrics join the window without waiting for them."""
    batch = train_step_lib.as_global_batch(local_batch, self.built.batch_shardings)
    state, metrics = self.built.train_step(state, batch, rng)
    self.window.append((step, metrics))
    return state

  def flush_metrics(self, step: int, *, write: bool) -> None:
    """Fetches the window's metrics, stops on a non-finite loss, and (`write`) logs them."""
    if not self.window:
      return
    fetched = jax.device_get([m for _, m in self.window])
    for (s, _), m in zip(self.window, fetched):
      if not np.isfinite(m["loss_sum"]) or not np.isfinite(m["grad_norm"]):
        where = (f"{self.manager.directory}/{self.last_saved} (step {self.last_saved})"
                 if self.last_saved is not None else "none (no checkpoint was saved)")
        raise NonFiniteLossError(
            f"Non-finite loss at step {s} (loss_sum={float(m['loss_sum'])}, "
            f"grad_norm={float(m['grad_norm'])}). Last good checkpoint: {where}.")
    if not write:
      return
    summary = summarize_metrics(fetched)
    elapsed = time.time() - self.window_start
    summary["seconds_per_step"] = elapsed / len(fetched)
    summary["examples_per_second"] = len(fetched) * self.data.batch_size / max(elapsed, 1e-9)
    self.log.write("train", step, summary)
    self.last_summary = summary
    remaining = (self.loop.train_steps - step) * summary["seconds_per_step"]
    print(f"step {step}/{self.loop.train_steps} loss={summary['loss']:.4f} "
          f"acc={summary['accuracy']:.3f} lr={summary['learning_rate']:.3g} "
          f"|g|={summary['grad_norm']:.3g} {summary['examples_per_second']:.1f} ex/s "
          f"{summary['seconds_per_step']:.3f} s/step ETA {_format_duration(remaining)}",
          flush=True)
    self.window = []
    self.window_start = time.time()

  def evaluate(self, state: train_step_lib.TrainState, step: int) -> dict[str, float]:
    """The eval sets' metrics at `step` (after checking the loss is finite): retrieval metrics for
    the dual encoder, exact match for the encoder-decoder (`model_kinds`)."""
    self.flush_metrics(step, write=False)
    eval_metrics = self.kind.evaluate(
        self.built, state.params, self.mesh, self.data, self.loop,
        os.path.join(self.model_dir, "eval_results", str(step)),
        eval_set_cache=self.eval_set_cache)
    self.log.write("eval", step, eval_metrics)
    print(f"eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in
                                           sorted(eval_metrics.items())), flush=True)
    return eval_metrics

  def save(self, state: train_step_lib.TrainState, step: int,
           metrics: dict[str, float] | None = None) -> None:
    """Checkpoints `state` at `step`; never a state after a non-finite loss."""
    self.flush_metrics(step, write=False)
    meta = {"step": step, "seed": self.seed, "prng_impl": self.prng_impl,
            "examples_seen": step * self.data.batch_size,
            "process_count": jax.process_count()}
    # The input iterator has produced exactly the batches of steps < `step` (no Python
    # read-ahead), so its state is the position of step `step`.
    path = checkpoints.save(self.manager, step, state, meta, metrics=metrics,
                            input_state=self.input_state)
    self.last_saved = step
    logging.info("Saved checkpoint %s", path)
    print(f"Saved checkpoint step {step}: {path}", flush=True)

  def close(self) -> None:
    self.log.close()


def _train_loop(preemption: _PreemptionFlag, mesh: jax.sharding.Mesh,
                batches: Iterator[dict[str, np.ndarray]], start_step: int,
                resume_step: int | None, *, model_dir, model, loss, optimizer, data, loop, seed,
                initial_checkpoint_path, chunks, prng_impl, input_state=None) -> TrainResult:
  """Builds the step, restores or initialises the state and runs the loop.

  `input_state`: the cached pipeline's iterator, saved with every checkpoint (None: uncached).
  """
  kind = model_kinds.of(model)
  spec = kind.batch_spec(
      data.batch_size, data.task_feature_lengths,
      num_negatives=0 if model_kinds.is_seq2seq(model) else num_negatives(data, loss))
  built = train_step_lib.build(model, loss, optimizer, mesh, spec, chunks)
  manager = checkpoints.create_manager(model_dir, keep=loop.keep_checkpoints,
                                       best_metric=loop.best_metric, best_mode=loop.best_mode)
  # Made by a jitted call with the replicated sharding, not device_put: with several processes
  # the sharding spans devices this process cannot address, which device_put refuses.
  rng = jax.jit(functools.partial(train_step_lib.base_key, seed, prng_impl),
                out_shardings=built.rng_sharding)()

  if resume_step is not None:
    state, meta = checkpoints.restore(manager, built.abstract_state, resume_step)
    logging.info("Resumed from %s at step %d", manager.directory, int(state.step))
    print(f"Resuming from checkpoint step {resume_step} in {manager.directory}", flush=True)
    if meta.get("seed", seed) != seed:
      logging.warning("Checkpoint seed %s != configured seed %s", meta.get("seed"), seed)
    # Checkpoints written before PRNG_IMPL existed used threefry2x32 keys.
    if meta.get("prng_impl", "threefry2x32") != prng_impl:
      logging.warning("Checkpoint was trained with PRNG_IMPL %r, this run uses %r: the steps "
                      "after step %d draw other dropout masks than the first run would have.",
                      meta.get("prng_impl", "threefry2x32"), prng_impl, resume_step)
  else:
    state = initial_state(built, seed, model, initial_checkpoint_path)
  assert int(state.step) == start_step, (int(state.step), start_step)

  steps = _LoopSteps(built, kind, manager, mesh, model_dir=model_dir, data=data, loop=loop, seed=seed,
                     last_saved=resume_step, prng_impl=prng_impl,
                     input_state=input_state)
  eval_metrics: dict[str, float] = {}
  preempted = False
  run_start = time.time()
  try:
    step = start_step
    while step < loop.train_steps:
      if preemption.should_stop(step):
        preempted = True
        break
      state = steps.train(state, step, next(batches), rng)
      step += 1
      if steps.is_log_step(step):
        steps.flush_metrics(step, write=True)
      evaluated = steps.is_eval_step(step)
      if evaluated:
        eval_metrics = steps.evaluate(state, step)
      if steps.is_checkpoint_step(step):
        steps.save(state, step, eval_metrics if evaluated and loop.best_metric else None)
    if preempted and steps.last_saved != step:
      steps.save(state, step)
    steps.flush_metrics(step, write=True)
  finally:
    steps.close()
  total = time.time() - run_start
  print(f"Finished at step {int(state.step)} in {_format_duration(total)}"
        f"{' (preempted)' if preempted else ''}; run directory {io_utils.abspath(model_dir)}",
        flush=True)
  return TrainResult(state=state, built=built, mesh=mesh, train_metrics=steps.last_summary,
                     eval_metrics=eval_metrics, preempted=preempted)
