"""Checkpoints: orbax save / restore / resume of the train state, and initial parameters.

Layout of a model directory:

  MODEL_DIR/checkpoints/<step>/state   the TrainState (step, params, optimizer state), sharded
  MODEL_DIR/checkpoints/<step>/meta    JSON: step, seed, examples seen, eval metrics

Saves are atomic (orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact); the last `keep` are kept, plus the best one
by an eval metric when one is named. The input stream position is the step itself (the data
pipeline is deterministic and resumable at a step), so restoring the state restores everything.

`restore_params` also reads the checkpoints that `python -m t5x.train --gin_file=gin/t5x/...` writes
(MODEL_DIR/checkpoint_<step>/state: t5x's orbax format, the same params tree under "target"), so
every command and INITIAL_CHECKPOINT_PATH accept them.

`load_initial_params` starts a run from another run's checkpoint (parameters only, e.g.
pre-training then MS MARCO fine-tuning) or from public T5 / GTR weights (via
`samtone_jax.models.hf_import`). Parameters are read into either layer layout
(`T5Config.scan_layers` or not) whichever layout the checkpoint was written in.
"""

from collections.abc import Mapping
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from samtone_jax import io_utils
from samtone_jax.models import t5

PyTree = Any
STATE_ITEM = "state"
META_ITEM = "meta"


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


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> str:
  """Saves `state` (sharded jax.Arrays) and the JSON `meta` at `step`; returns its directory."""
  manager.save(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
               metrics=metrics, force=True)
  manager.wait_until_finished()
  return os.path.join(manager.directory, str(step))


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
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}))
  return restored[STATE_ITEM], restored[META_ITEM]


class UnsupportedCheckpointError(ValueError):
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
  raise FileNotFoundError(f"No samtone_jax or t5x checkpoint under {run_path!r} (expected "
                          "MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step> of "
                          "samtone_jax, or a t5x MODEL_DIR or MODEL_DIR/checkpoint_<step>).")


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

  Parameters of `abstract_params` missing from the checkpoint (e.g. a learned temperature that the
  earlier stage did not have) raise an error naming them.
  """
  step_dir, checkpoint_format = _resolve_checkpoint(path)
  # t5x keeps the params tree ({"model": ..., ["loss": ...]}, see t5x_model.py) under "target".
  params_key = _PARAMS_KEY[checkpoint_format]
  checkpointer = ocp.PyTreeCheckpointer()
  item_dir = os.path.join(step_dir, STATE_ITEM)
  stored = checkpointer.metadata(item_dir)
  stored_tree = getattr(stored, "item_metadata", stored)
  stored_tree = getattr(stored_tree, "tree", stored_tree)
  stored_params = stored_tree[params_key]
  wanted = {k: v for k, v in abstract_params.items() if k in stored_params}
  missing = [k for k, v in abstract_params.items() if k not in stored_params and v]
  if missing:
    raise ValueError(f"Checkpoint {step_dir} has no params[{missing}]")
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
  restore_args = ocp.checkpoint_utils.construct_restore_args({params_key: target})
  restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
      item={params_key: target}, restore_args=restore_args, partial_restore=True))
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
  if not isinstance(tree, Mapping):
    return tree
  out = {k: _abstract_unstacked(v) for k, v in tree.items() if k != "layers"}
  if "layers" in tree:
    num_layers = jax.tree.leaves(tree["layers"])[0].shape[0]
    for i in range(num_layers):
      out[f"layers_{i}"] = jax.tree.map(lambda a: _with_spec(a, a.shape[1:], _spec(a)[1:]),
                                        tree["layers"])
  return out


def _abstract_stacked(tree: Any) -> Any:
  """Abstract `layers_{i}` -> one stacked `layers` (layer axis replicated)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: _abstract_stacked(v) for k, v in tree.items() if t5.layer_index(k) is None}
  layers = [tree[k] for k in sorted((k for k in tree if t5.layer_index(k) is not None),
                                    key=t5.layer_index)]
  if layers:
    out["layers"] = jax.tree.map(
        lambda a: _with_spec(a, (len(layers),) + a.shape, (None,) + _spec(a)), layers[0])
  return out


def load_initial_params(path: str, init_params: PyTree, model_config: Any) -> PyTree:
  """Initial parameters from `path`: a samtone_jax checkpoint, or public T5 / GTR weights.

  Args:
    path: a samtone_jax or t5x run / checkpoint directory (params only are read); a sentence-transformers
      GTR directory (modules.json: encoder, projection); or a Hugging Face T5 / T5 1.1 directory
      (config.json + weights: encoder only, the projection keeps its fresh initialisation).
    init_params: the freshly initialised, sharded {"model": ..., "loss": ...}; gives the
      shardings, and the values of whatever `path` does not provide.
    model_config: the DualEncoderConfig; imported weights must match its architecture.

  Returns:
    {"model": ..., "loss": ...} placed with the shardings of `init_params`.
  """
  shardings = jax.tree.map(lambda a: a.sharding, init_params)
  if is_samtone_checkpoint(path) or is_t5x_checkpoint(path):  # (a legacy t5x one is refused)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            init_params)
    loaded = restore_params(path, abstract)
    return {**init_params, **loaded}
  from samtone_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  if io_utils.exists(os.path.join(path, "modules.json")):
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
