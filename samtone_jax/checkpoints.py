"""Checkpoints: orbax save / restore / resume of the train state, and initial parameters.

Layout of a model directory:

  MODEL_DIR/checkpoints/<step>/state   the TrainState (step, params, optimizer state), sharded
  MODEL_DIR/checkpoints/<step>/meta    JSON: step, seed, prng_impl, examples seen, eval metrics

  MODEL_DIR/checkpoints/<step>/files.json  {relative path: size in bytes} of every file of the step
  MODEL_DIR/checkpoints/<step>/input/process_<i>-of-<n>.*   cached-task runs only: host i's
                                       tf.data iterator state (pipeline.InputIterator), written
                                       by host i before files.json, so the manifest covers it

Saves are atomic (orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact); the last `keep` are kept, plus the best one
by an eval metric when one is named. For uncached tasks the input stream position is the step
itself (the data pipeline is deterministic and resumable at a step, by skipping); for cached tasks
it is each host's iterator state under `input/`, restored in constant time.

`restore_params` also reads the checkpoints that `python -m t5x.train --gin_file=gin/t5x/...` writes
(MODEL_DIR/checkpoint_<step>/state: t5x's orbax format, the same params tree under "target"), so
every command and INITIAL_CHECKPOINT_PATH accept them.

Integrity: `files.json` is written after the save completes. `find_damage(step_dir)` compares the
files with it (and, for checkpoints without one, parses the JSON metadata files), so a file
truncated or lost after the save (a full disk, a partial copy, a bad sync) is named before orbax or
TensorStore read it. Every restore (resume, initial parameters, evaluate, encode) also compares the
stored parameter tree with the model's (names, shapes, dtypes) and raises `CheckpointError`
listing the differences and their likely cause. A damaged step is reported with the newest intact
earlier step; `choose_resume_step(..., fallback=True)` resumes from it.

`load_initial_params` starts a run from another run's checkpoint (parameters only, e.g.
pre-training then MS MARCO fine-tuning) or from public T5 / GTR weights (via
`samtone_jax.models.hf_import`). Parameters are read into either layer layout
(`T5Config.scan_layers` or not) whichever layout the checkpoint was written in.
"""

from collections.abc import Mapping
import json
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers
import tensorflow as tf

from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax.models import t5

PyTree = Any
STATE_ITEM = "state"
META_ITEM = "meta"
FILES_MANIFEST = "files.json"
ORBAX_COMMIT_MARKER = "commit_success.txt"  # how orbax marks a finished save on gs://
FALLBACK_BINDING = "--gin.trainer.LoopConfig.resume_fallback=True"


def checkpoint_dir(model_dir: str) -> str:
  # abspath only for local paths: on a pod MODEL_DIR is gs://..., which abspath would mangle.
  return os.path.join(io_utils.abspath(model_dir), "checkpoints")


def create_manager(model_dir: str, *, keep: int = 3, best_metric: str | None = None,
                   best_mode: str = "max", read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager for `MODEL_DIR/checkpoints`.

  Args:
    model_dir: the run directory.
    keep: keep the latest `keep` checkpoints.
    best_metric: additionally keep the checkpoint with the best value of this eval metric (the
      `metrics` passed to `save`); None: latest only.
    best_mode: "max" or "min" for `best_metric`.
    read_only: open an existing directory without creating or deleting anything.
  """
  policies = [checkpoint_managers.LatestN(n=keep)]
  if best_metric is not None:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      create=not read_only, read_only=read_only,
      # Saves block until written: a checkpoint is complete before training continues, so that a
      # preemption right after `save` cannot lose it. Our checkpoints are rare and small next to
      # the step time of a real run.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(checkpoint_dir(model_dir), options=options,
                               item_names=(STATE_ITEM, META_ITEM))


INPUT_STATE_DIR = "input"


def input_state_prefix(step_dir: str, process_index: int, process_count: int) -> str:
  """Where host `process_index` of `process_count` keeps its input iterator state in a step."""
  return os.path.join(step_dir, INPUT_STATE_DIR,
                      f"process_{process_index:05d}-of-{process_count:05d}")


def input_state_process_counts(step_dir: str) -> list[int]:
  """The process counts whose input states a step holds (normally one), ascending."""
  directory = os.path.join(step_dir, INPUT_STATE_DIR)
  if not io_utils.isdir(directory):
    return []
  counts = set()
  for name in tf.io.gfile.listdir(directory):
    if name.startswith("process_") and "-of-" in name:
      counts.add(int(name.split("-of-")[1].split(".")[0]))
  return sorted(counts)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: dict[str, Any],
         metrics: dict[str, float] | None = None, input_state: Any = None) -> str:
  """Saves `state` (sharded jax.Arrays) and the JSON `meta` at `step`; returns its directory.

  `input_state`: this host's input iterator (anything with `save(prefix)`, e.g.
  `pipeline.InputIterator`), saved by every host under `<step>/input/` before files.json.
  """
  manager.save(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
               metrics=metrics, force=True)
  manager.wait_until_finished()
  step_dir = os.path.join(manager.directory, str(step))
  if input_state is not None:
    input_state.save(input_state_prefix(step_dir, jax.process_index(), jax.process_count()))
    if jax.process_count() > 1:
      # files.json (process 0) must list every host's input state.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"input state of step {step} saved")
  if jax.process_index() == 0:
    write_files_manifest(step_dir)
  return step_dir


def _walk_files(step_dir: str) -> dict[str, int]:
  """{path relative to `step_dir`: size} of every file below it (local or gs://)."""
  sizes = {}
  for directory, _, files in tf.io.gfile.walk(step_dir):
    for name in files:
      path = os.path.join(directory, name)
      sizes[os.path.relpath(path, step_dir) if io_utils.is_local(step_dir)
            else path[len(step_dir.rstrip("/")) + 1:]] = tf.io.gfile.stat(path).length
  sizes.pop(FILES_MANIFEST, None)
  return sizes


def write_files_manifest(step_dir: str) -> None:
  """Records the size of every file of a completed checkpoint step in `<step>/files.json`."""
  with io_utils.open_file(os.path.join(step_dir, FILES_MANIFEST), "w") as f:
    json.dump(_walk_files(step_dir), f, indent=0, sort_keys=True)


def find_damage(step_dir: str) -> str | None:
  """What is wrong with checkpoint `step_dir` (naming the file), or None if it looks intact.

  With `files.json`: every listed file must exist with its recorded size. Without it (a
  checkpoint written before it existed, or a save killed before it was written): the JSON
  metadata files must parse and the state and meta items must exist.
  """
  manifest_path = os.path.join(step_dir, FILES_MANIFEST)
  if io_utils.exists(manifest_path):
    try:
      with io_utils.open_file(manifest_path) as f:
        expected = json.load(f)
    except ValueError:
      return f"{manifest_path} is not valid JSON (truncated?)"
    actual = _walk_files(step_dir)
    for name, size in sorted(expected.items()):
      path = os.path.join(step_dir, name)
      if name not in actual:
        return f"{path} is missing"
      if actual[name] != size:
        return f"{path} has {actual[name]} bytes, {size} when it was saved (truncated?)"
    return None
  for item in (STATE_ITEM, META_ITEM):
    if not io_utils.isdir(os.path.join(step_dir, item)):
      return f"{os.path.join(step_dir, item)} is missing"
  for name in ("_CHECKPOINT_METADATA", os.path.join(STATE_ITEM, "_METADATA"),
               os.path.join(META_ITEM, "metadata")):
    path = os.path.join(step_dir, name)
    if not io_utils.exists(path):
      continue
    try:
      with io_utils.open_file(path) as f:
        json.loads(f.read())
    except ValueError as e:
      return f"{path} is not valid JSON ({e}; truncated?)"
  return None


def checkpoint_steps(model_dir: str) -> list[int]:
  """The completed checkpoint steps of a run directory, ascending (no directory: [])."""
  directory = checkpoint_dir(model_dir)
  if not io_utils.isdir(directory):
    return []
  steps = sorted(int(d) for d in io_utils.listdir(directory) if d.isdigit())
  if io_utils.is_local(directory):
    return steps  # orbax renames a finished temporary directory: a <step> name means complete
  # Object stores have no atomic rename: orbax writes <step>/ in place and marks it complete last.
  return [s for s in steps
          if io_utils.exists(os.path.join(directory, str(s), ORBAX_COMMIT_MARKER))]


def latest_step_in(model_dir: str) -> int | None:
  """The newest completed checkpoint step of `model_dir`, without creating anything."""
  steps = checkpoint_steps(model_dir)
  return steps[-1] if steps else None


def _damage_report(step_dir: str, problem: str, intact: int | None, what_to_do: str) -> str:
  earlier = (f"The newest intact earlier checkpoint is step {intact}. " if intact is not None
             else "No earlier checkpoint is intact. ")
  return f"Checkpoint {step_dir} is damaged: {problem}. {earlier}{what_to_do}"


def newest_intact_step(model_dir: str, below: int) -> int | None:
  """The newest step < `below` of `model_dir` in which `find_damage` finds nothing."""
  for step in reversed(checkpoint_steps(model_dir)):
    if step < below and find_damage(os.path.join(checkpoint_dir(model_dir), str(step))) is None:
      return step
  return None


def choose_resume_step(model_dir: str, *, fallback: bool = False) -> int | None:
  """The step to resume `model_dir` from: its newest checkpoint, if intact.

  Args:
    model_dir: the run directory.
    fallback: when the newest checkpoint is damaged, delete it (and any other damaged step
      after the newest intact one) and return the newest intact step, with a warning.

  Returns:
    The step, or None when the directory has no checkpoint.

  Raises:
    errors.CheckpointError: the newest checkpoint is damaged and `fallback` is off (the message
      names the step, the file and the newest intact step), or no checkpoint is intact.
  """
  steps = checkpoint_steps(model_dir)
  if not steps:
    return None
  directory = checkpoint_dir(model_dir)
  newest_dir = os.path.join(directory, str(steps[-1]))
  problem = find_damage(newest_dir)
  if problem is None:
    return steps[-1]
  intact = newest_intact_step(model_dir, steps[-1])
  if not fallback or intact is None:
    what_to_do = (f"Set {FALLBACK_BINDING} to resume from step {intact} (the damaged steps are "
                  "deleted), or restore the damaged files from a copy."
                  if intact is not None else
                  "Restore the files from a copy, or start again in a new MODEL_DIR.")
    raise errors.CheckpointError(_damage_report(newest_dir, problem, intact, what_to_do))
  for step in steps:
    # One process deletes (the hosts of a pod share the directory); every host returns `intact`.
    if step > intact and jax.process_index() == 0:
      step_dir = os.path.join(directory, str(step))
      logging.warning("Deleting damaged checkpoint %s (%s).", step_dir,
                      find_damage(step_dir) or "after the fallback step")
      tf.io.gfile.rmtree(step_dir)
  message = (f"Warning: checkpoint {newest_dir} is damaged ({problem}); resuming from the "
             f"newest intact step {intact} ({FALLBACK_BINDING}).")
  logging.warning("%s", message)
  print(message, flush=True)
  return intact


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  return manager.latest_step()


def restore(manager: ocp.CheckpointManager, abstract_state: PyTree, step: int | None = None
            ) -> tuple[PyTree, dict[str, Any]]:
  """Restores the state (into the shardings carried by `abstract_state`'s ShapeDtypeStructs).

  Returns:
    (state, meta).
  Raises:
    FileNotFoundError: no checkpoint in the directory.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}")
  step_dir = os.path.join(str(manager.directory), str(step))
  _check_readable(step_dir)
  check_tree(step_dir, _stored_tree(step_dir)["params"], abstract_state.params)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(step_dir, e) from e
  return restored[STATE_ITEM], restored[META_ITEM]


def _model_dir_of(step_dir: str) -> str:
  return os.path.dirname(os.path.dirname(step_dir.rstrip("/")))


def _check_readable(step_dir: str) -> None:
  """Raises CheckpointError naming the damaged file and the newest intact earlier step."""
  problem = find_damage(step_dir)
  if problem is not None:
    step = int(os.path.basename(step_dir.rstrip("/")))
    intact = newest_intact_step(_model_dir_of(step_dir), step)
    raise errors.CheckpointError(_damage_report(
        step_dir, problem, intact,
        f"Use checkpoints/{intact} instead (to resume training from it: {FALLBACK_BINDING})."
        if intact is not None else "Restore the files from a copy."))


def _read_error(step_dir: str, error: Exception) -> errors.CheckpointError:
  """A CheckpointError for an orbax / TensorStore failure reading `step_dir`."""
  step = os.path.basename(step_dir.rstrip("/"))
  intact = newest_intact_step(_model_dir_of(step_dir), int(step)) if step.isdigit() else None
  return errors.CheckpointError(_damage_report(
      step_dir, f"reading it failed with {type(error).__name__}: {str(error)[:500]}", intact,
      "The checkpoint is probably corrupt or was written by an incompatible version; use an "
      "earlier step" + (f" (to resume training from it: {FALLBACK_BINDING})."
                        if intact is not None else ".")))


def _stored_tree(step_dir: str, params_key: str = "params") -> PyTree:
  """The state's metadata tree (ArrayMetadata leaves with .shape / .dtype) of a step; its params
  are under `params_key` ("target" in a t5x checkpoint)."""
  try:
    stored = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, STATE_ITEM))
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(step_dir, e) from e
  stored = getattr(stored, "item_metadata", stored)
  stored = getattr(stored, "tree", stored)
  if not isinstance(stored, Mapping) or params_key not in stored:
    raise _read_error(step_dir, ValueError("its state has no params"))
  return stored


def _flat(tree: PyTree) -> dict[str, Any]:
  """{"model/encoder/.../kernel": leaf} of a nested mapping."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None):
    out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
  return out


def _likely_cause(missing: list[str], unexpected: list[str],
                  mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
  """A guess at the configuration that differs, from the parameters that differ.

  Args:
    missing / unexpected: flat names ("model/query_encoder/...") only in the model / checkpoint.
    mismatched: (name, checkpoint shape, model shape) of parameters in both.
  """
  def components(names):  # "model/query_encoder/layers_0/..." -> "query_encoder"
    return {n.split("/")[1] if n.startswith("model/") and n.count("/") > 1 else n.split("/")[0]
            for n in names}

  if components(missing) != components(unexpected) and (missing or unexpected):
    return ("the tower sharing differs (gin/architectures/*.gin: sde, ade, ade_ste, ade_fte, "
            "ade_spl); use the architecture file the checkpoint was trained with")
  if any("layers" in n for n in missing + unexpected):
    return "the number of layers differs (config.T5Config.num_layers, gin/models/*.gin)"
  for name, have, want in mismatched:
    if name.endswith("embedding") and have[1:] == want[1:]:
      return (f"the vocabulary size differs (config.T5Config.vocab_size: checkpoint {have[0]}, "
              f"model {want[0]})")
    if "projection" in name and have[:1] == want[:1]:
      return (f"the projection size differs (config.DualEncoderConfig.projection_dim: checkpoint "
              f"{have[-1]}, model {want[-1]})")
  return ("the model size differs (gin/models/*.gin: d_model, d_ff, num_heads, d_kv); use the "
          "model file the checkpoint was trained with")


def check_tree(step_dir: str, stored: PyTree, wanted: PyTree) -> None:
  """Raises CheckpointError unless `stored` (metadata) and `wanted` (ShapeDtypeStructs) have the
  same parameter names, shapes and dtypes; the message lists the differences and a likely cause.
  """
  stored_flat, wanted_flat = _flat(stored), _flat(wanted)
  missing = sorted(set(wanted_flat) - set(stored_flat))
  unexpected = sorted(set(stored_flat) - set(wanted_flat))
  mismatched, shapes = [], []
  for name in sorted(set(stored_flat) & set(wanted_flat)):
    have, want = stored_flat[name], wanted_flat[name]
    if tuple(have.shape) != tuple(want.shape) or jax.numpy.dtype(have.dtype) != want.dtype:
      mismatched.append(f"{name}: checkpoint {tuple(have.shape)} {jax.numpy.dtype(have.dtype)}, "
                        f"model {tuple(want.shape)} {want.dtype}")
      shapes.append((name, tuple(have.shape), tuple(want.shape)))
  if not (missing or unexpected or mismatched):
    return

  def listing(title, items):
    shown = items[:8] + ([f"... {len(items) - 8} more"] if len(items) > 8 else [])
    return f"\n  {title} ({len(items)}): " + ", ".join(shown) if items else ""

  cause = _likely_cause(missing, unexpected, shapes)
  groups = lambda flat: sorted({"/".join(n.split("/")[:2]) for n in flat})
  group_line = ("" if groups(stored_flat) == groups(wanted_flat) else
                f"\n  parameter groups: checkpoint {', '.join(groups(stored_flat))}; model "
                f"{', '.join(groups(wanted_flat))}")
  raise errors.CheckpointError(
      f"Checkpoint {step_dir} does not fit the configured model: likely {cause}."
      + group_line
      + listing("in the model, not in the checkpoint", missing)
      + listing("in the checkpoint, not in the model", unexpected)
      + listing("different shape or dtype", mismatched))


class UnsupportedCheckpointError(errors.CheckpointError, ValueError):
  """A checkpoint in a format samtone_jax cannot read (e.g. a legacy msgpack t5x checkpoint)."""


T5X_STEP_PREFIX = "checkpoint_"
# Where each format keeps the parameters inside its orbax state item.
_PARAMS_KEY = {"samtone_jax": "params", "t5x": "target"}


def _t5x_step(name: str) -> int | None:
  name = name.rstrip("/")
  suffix = name[len(T5X_STEP_PREFIX):]
  return int(suffix) if name.startswith(T5X_STEP_PREFIX) and suffix.isdigit() else None


def _is_t5x_step_dir(path: str) -> bool:
  """t5x writes MODEL_DIR/checkpoint_<step>/state (orbax) or, before orbax, a msgpack
  MODEL_DIR/checkpoint_<step>/checkpoint."""
  return _t5x_step(os.path.basename(path.rstrip("/"))) is not None and (
      io_utils.isdir(os.path.join(path, STATE_ITEM))
      or io_utils.exists(os.path.join(path, "checkpoint")))


def _resolve_t5x_step_dir(path: str) -> str | None:
  """A t5x model directory or one checkpoint_<step> directory -> that (or the latest) step
  directory; None when `path` is neither."""
  if _is_t5x_step_dir(path):
    return path
  if not io_utils.isdir(path):
    return None
  steps = [(_t5x_step(d), d.rstrip("/")) for d in io_utils.listdir(path)]
  steps = sorted((s, d) for s, d in steps
                 if s is not None and _is_t5x_step_dir(os.path.join(path, d)))
  return os.path.join(path, steps[-1][1]) if steps else None


def is_t5x_checkpoint(path: str) -> bool:
  """Whether `path` is a t5x model directory or one of its checkpoint_<step> directories."""
  return _resolve_t5x_step_dir(io_utils.abspath(path)) is not None


def _resolve_checkpoint(path: str) -> tuple[str, str]:
  """A checkpoint path -> (step directory, format "samtone_jax" or "t5x").

  samtone_jax: a run directory, its `checkpoints/` directory, or one `<step>` directory (the
  latest step when several). t5x (`python -m t5x.train` with gin/t5x/*.gin): its MODEL_DIR or
  one `checkpoint_<step>` directory, in t5x's orbax format (`checkpoint_<step>/state`).
  """
  path = io_utils.abspath(path)
  if io_utils.isdir(os.path.join(path, STATE_ITEM)) and _t5x_step(os.path.basename(path)) is None:
    return path, "samtone_jax"
  run_path = path
  if io_utils.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = [int(d) for d in io_utils.listdir(path) if d.isdigit()] if io_utils.isdir(path) else []
  if steps:
    return os.path.join(path, str(max(steps))), "samtone_jax"
  t5x_step_dir = _resolve_t5x_step_dir(run_path)
  if t5x_step_dir is not None:
    if not io_utils.isdir(os.path.join(t5x_step_dir, STATE_ITEM)):
      raise UnsupportedCheckpointError(
          f"{t5x_step_dir!r} is a t5x checkpoint in t5x's legacy msgpack format "
          "(checkpoint_<step>/checkpoint), which samtone_jax does not read; evaluate it with "
          "t5x itself (docs/t5x.md), or rewrite it with t5x in its orbax format "
          "(checkpoint_<step>/state, what current t5x writes).")
    return t5x_step_dir, "t5x"
  raise errors.CheckpointNotFoundError(
      f"No samtone_jax or t5x checkpoint under {run_path!r} (expected MODEL_DIR, "
      "MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step> of samtone_jax, or a t5x MODEL_DIR "
      "or MODEL_DIR/checkpoint_<step>; e.g. --gin.CHECKPOINT_PATH=\\\"/path/to/run\\\").")


def resolve_step_dir(path: str) -> str:
  """The step directory that `restore_params(path, ...)` reads: checkpoints/<step> of a
  samtone_jax run (the latest of a run or checkpoints/ directory), or checkpoint_<step> of a t5x
  run.

  Raises:
    FileNotFoundError: no checkpoint under `path`.
    UnsupportedCheckpointError: `path` is a legacy (msgpack) t5x checkpoint.
  """
  return _resolve_checkpoint(path)[0]


def is_samtone_checkpoint(path: str) -> bool:
  """Whether `restore_params` reads `path` (a samtone_jax or an orbax-format t5x checkpoint)."""
  try:
    _resolve_checkpoint(path)
    return True
  except (FileNotFoundError, UnsupportedCheckpointError):
    return False


def restore_params(path: str, abstract_params: PyTree) -> PyTree:
  """Restores only `params` of a samtone_jax or t5x checkpoint (any optimizer), sharded like
  `abstract_params` (a tree of ShapeDtypeStruct with shardings: {"model": ..., "loss": ...}).

  `path` is resolved by `resolve_step_dir`. A t5x checkpoint of `t5x_model.DualEncoderModel`
  holds the same params tree (under "target"); a fixed temperature leaves out "loss".

  The stored tree must match `abstract_params` (converted to the stored layer layout) in names,
  shapes and dtypes; extra top-level subtrees of the checkpoint (e.g. the loss's learned
  temperature when only the model is wanted) are ignored.

  Raises:
    errors.CheckpointError: the step is damaged (naming the file and the newest intact earlier
      step), or its parameters do not fit `abstract_params` (naming the differences).
  """
  step_dir, checkpoint_format = _resolve_checkpoint(path)
  # t5x keeps the params tree ({"model": ..., ["loss": ...]}, see t5x_model.py) under "target".
  params_key = _PARAMS_KEY[checkpoint_format]
  if checkpoint_format == "samtone_jax":  # t5x writes no files.json and other step names
    _check_readable(step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  item_dir = os.path.join(step_dir, STATE_ITEM)
  stored_params = _stored_tree(step_dir, params_key)[params_key]
  wanted = {k: v for k, v in abstract_params.items() if k in stored_params}
  missing = [k for k, v in abstract_params.items() if k not in stored_params and v]
  if missing:
    raise errors.CheckpointError(
        f"Checkpoint {step_dir} has no params[{missing}] (e.g. a learned temperature the "
        "earlier run did not have); configure the model as that run was.")
  # A checkpoint of the other layer layout (T5Config.scan_layers on one side only) is read in its
  # own layout, sharded like the target's layers, and converted.
  stored_layout, wanted_layout = _layer_layout(stored_params), _layer_layout(wanted)
  convert = None
  if stored_layout == "unrolled" and wanted_layout == "stacked":
    target, convert = _abstract_unstacked(wanted), t5.stack_layers
  elif stored_layout == "stacked" and wanted_layout == "unrolled":
    target, convert = _abstract_stacked(wanted), t5.unstack_layers
  else:
    target = wanted
  check_tree(step_dir, {k: stored_params[k] for k in target}, target)
  restore_args = ocp.checkpoint_utils.construct_restore_args({params_key: target})
  try:
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item={params_key: target}, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(step_dir, e) from e
  params = dict(restored[params_key])
  if convert is not None:
    shardings = jax.tree.map(lambda a: a.sharding, wanted)
    params = dict(jax.jit(convert, out_shardings=shardings)(params))
    logging.info("Converted %s layers of %s to the %s layout", stored_layout, step_dir,
                 wanted_layout)
  for k, v in abstract_params.items():
    params.setdefault(k, v)  # empty subtrees (e.g. {} loss params)
  logging.info("Initial params restored from %s", step_dir)
  return params


def _layer_layout(tree: Any) -> str | None:
  """'stacked' if a params tree has `layers` subtrees (scan_layers), 'unrolled' if it has
  `layers_0`, None if neither."""
  if not isinstance(tree, Mapping):
    return None
  if "layers" in tree:
    return "stacked"
  if "layers_0" in tree:
    return "unrolled"
  for value in tree.values():
    layout = _layer_layout(value)
    if layout is not None:
      return layout
  return None


def _with_spec(a: jax.ShapeDtypeStruct, shape: tuple[int, ...], spec: tuple[Any, ...]
               ) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, a.dtype, sharding=NamedSharding(a.sharding.mesh, P(*spec)))


def _spec(a: jax.ShapeDtypeStruct) -> tuple[Any, ...]:
  spec = tuple(a.sharding.spec)
  return spec + (None,) * (len(a.shape) - len(spec))


def _abstract_unstacked(tree: Any) -> Any:
  """Abstract stacked `layers` -> `layers_{i}` (each layer sharded like the stacked slice)."""
  return t5.unstack_layers(tree, lambda a, _: _with_spec(a, a.shape[1:], _spec(a)[1:]))


def _abstract_stacked(tree: Any) -> Any:
  """Abstract `layers_{i}` -> one stacked `layers` (layer axis replicated)."""
  return t5.stack_layers(
      tree, lambda *layers: _with_spec(layers[0], (len(layers),) + layers[0].shape,
                                       (None,) + _spec(layers[0])))


def load_initial_params(path: str, init_params: PyTree, model_config: Any) -> PyTree:
  """Initial parameters from `path`: a samtone_jax checkpoint, or public T5 / GTR weights.

  Args:
    path: a samtone_jax or t5x run / checkpoint directory (params only are read; an
      encoder-decoder's, for a dual encoder, gives its encoder: `encoder_of_encoder_decoder`); a sentence-transformers
      GTR directory (modules.json: encoder, projection); or a Hugging Face T5 / T5 1.1 directory
      (config.json + weights: encoder only, the projection keeps its fresh initialisation; for
      an encoder-decoder `model_config`, the whole T5ForConditionalGeneration).
    init_params: the freshly initialised, sharded {"model": ..., "loss": ...}; gives the
      shardings, and the values of whatever `path` does not provide.
    model_config: the DualEncoderConfig or seq2seq_model.EncoderDecoderModel; imported weights
      must match its architecture.

  Returns:
    {"model": ..., "loss": ...} placed with the shardings of `init_params`.
  """
  shardings = jax.tree.map(lambda a: a.sharding, init_params)
  if is_encoder_decoder_checkpoint(path) and "decoder" not in init_params["model"]:
    return encoder_of_encoder_decoder(path, init_params, model_config)  # SKILL -> dual encoder
  if is_samtone_checkpoint(path) or is_t5x_checkpoint(path):  # (a legacy t5x one is refused)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            init_params)
    loaded = restore_params(path, abstract)
    return {**init_params, **loaded}
  from samtone_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  from samtone_jax import model_kinds  # pylint: disable=g-import-not-at-top
  if model_kinds.is_seq2seq(model_config) and io_utils.exists(os.path.join(path, "config.json")):
    # A Hugging Face T5ForConditionalGeneration: encoder, decoder and head.
    _, model_params = hf_import.import_t5_encoder_decoder(path, config=model_config.config)
  elif io_utils.exists(os.path.join(path, "modules.json")):
    _, model_params = hf_import.import_sentence_transformers(path, config=model_config)
  elif io_utils.exists(os.path.join(path, "config.json")):
    _, encoder = hf_import.import_t5_encoder(path, config=model_config.encoder)
    model_params = dict(jax.device_get(init_params["model"]))
    model_params.update(hf_import.dual_encoder_params(model_config, encoder))
  else:
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH={path!r} is neither a samtone_jax checkpoint, a "
        "sentence-transformers directory (modules.json) nor a Hugging Face T5 directory "
        "(config.json).")
  model_params = jax.tree.map(lambda x, s: jax.device_put(x, s), model_params,
                              shardings["model"])
  logging.info("Initial params imported from %s", path)
  return {**init_params, "model": model_params}


def is_encoder_decoder_checkpoint(path: str) -> bool:
  """Whether `path` is a samtone_jax checkpoint (or run) of the encoder-decoder (SKILL): its
  params["model"] has a "decoder" subtree."""
  if not is_samtone_checkpoint(path):
    return False
  step_dir, checkpoint_format = _resolve_checkpoint(path)
  stored = _stored_tree(step_dir, _PARAMS_KEY[checkpoint_format])[_PARAMS_KEY[checkpoint_format]]
  return isinstance(stored.get("model"), Mapping) and "decoder" in stored["model"]


def encoder_of_encoder_decoder(path: str, init_params: PyTree, model_config: Any) -> PyTree:
  """A dual encoder's initial params from an encoder-decoder checkpoint: its encoder (token
  embedding included) laid into every tower (`hf_import.dual_encoder_params`); the projection(s)
  and loss params keep `init_params`' values. Params only; the decoder is not read.

  Args:
    path: a samtone_jax encoder-decoder run / checkpoint directory.
    init_params: the dual encoder's fresh, sharded {"model": ..., "loss": ...}.
    model_config: the DualEncoderConfig; its encoder must have the checkpoint's sizes and layer
      layout.

  Raises:
    errors.CheckpointError: the checkpoint's encoder does not fit `model_config.encoder`.
  """
  from samtone_jax.models import encoder_decoder  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  step_dir, checkpoint_format = _resolve_checkpoint(path)
  stored = _stored_tree(step_dir, _PARAMS_KEY[checkpoint_format])[_PARAMS_KEY[checkpoint_format]]
  some_leaf = jax.tree.leaves(init_params["model"])[0]
  replicated = NamedSharding(some_leaf.sharding.mesh, P())
  abstract = {"model": jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
      dict(stored["model"]))}
  loaded = restore_params(path, abstract)["model"]
  encoder = encoder_decoder.encoder_params(loaded)
  try:
    laid = hf_import.dual_encoder_params(model_config, encoder)
    model_params = {**dict(init_params["model"]), **laid}
    check_tree(step_dir, model_params, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), dict(init_params["model"])))
  except (KeyError, ValueError) as e:
    raise errors.CheckpointError(
        f"The encoder of encoder-decoder checkpoint {step_dir} does not fit the dual encoder's "
        f"T5Config (sizes, layer layout): {e}") from e
  shardings = jax.tree.map(lambda a: a.sharding, init_params["model"])
  model_params = jax.tree.map(jax.device_put, model_params, shardings)
  logging.info("Initial dual-encoder params: the encoder of encoder-decoder %s", step_dir)
  return {**init_params, "model": model_params}
