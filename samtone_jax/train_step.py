"""The pure training step of the dual encoder, its train state, and how both are built sharded.

Nothing here touches the host: no logging, no files. `train_step(state, batch, rng)` is one
optimizer step; `build(...)` returns everything the trainer (and the ahead-of-time compile check,
`samtone_jax/aot.py`) needs: the abstract train state with its shardings, the sharded
initialiser, and the jitted step with in/out shardings and the state donated.

The optimised parameter tree is `{"model": <DualEncoder params>, "loss": {...}}`, where "loss"
holds `log_temperature` when the temperature is learned and is empty otherwise.

Huge batches (`ChunkConfig`): the same update can be computed in pieces. With gradient caching
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") each
device encodes its examples `embedding_chunk_size` at a time, keeping only the embeddings; the
sharded loss and its gradient w.r.t. the embeddings and the temperature are computed on them; then
each chunk is encoded again under `jax.vjp` and its embedding cotangents accumulate the parameter
gradients in a `lax.scan`. Activation memory is that of one chunk; per-example dropout keys (see
`models/dual_encoder.py`) make the re-encoded chunks draw the masks of the plain step.
"""

import dataclasses
import functools
from typing import Any, NamedTuple
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from jax import lax

from samtone_jax import losses
from samtone_jax import model_kinds
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax.models import config as model_config_lib
from samtone_jax.models import dual_encoder
from samtone_jax.models import t5
from samtone_jax.tasks import features

Array = jax.Array
PyTree = Any


def __getattr__(name: str) -> Any:
  """The old spelling `train_step.LossConfig` (gin files, `--gin.` bindings, code), deprecated.

  `LossConfig` moved to `losses.LossConfig`; for one release the old name is the same class, so
  gin binds the one configurable whichever spelling a file uses (a FutureWarning names the new
  spelling). Remove after the next release.
  """
  if name == "LossConfig":
    warnings.warn("train_step.LossConfig is deprecated and will be removed after the next "
                  "release: spell it losses.LossConfig (`from samtone_jax import losses` in gin "
                  "files, --gin.losses.LossConfig.X=Y on the command line).", FutureWarning,
                  stacklevel=2)
    return losses.LossConfig
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Trading compute for memory at huge batches; the update is the one of the unchunked step.

  Bound by the EMBEDDING_CHUNK_SIZE and LOSS_CHUNK_SIZE macros of `gin/runs/pretrain.gin`.

  Attributes:
    embedding_chunk_size: gradient caching: each device encodes this many of its examples at a
      time (queries, passages and their hard negatives), once without activations for the
      embeddings and once more under `jax.vjp` for the gradients: activation memory is that of
      one chunk, at the cost of one extra forward pass. Must divide the per-device batch
      (BATCH_SIZE / data-axis size). 0: off, the whole batch is encoded and differentiated at once.
    loss_chunk_size: the contrastive loss takes each device's anchors this many at a time,
      recomputing each block in the backward pass (`losses.contrastive_loss(row_chunk_size=...)`):
      loss memory O(loss_chunk_size * BATCH_SIZE) instead of O(per-device batch * BATCH_SIZE).
      Must divide the per-device batch. 0: off.
  """

  embedding_chunk_size: int = 0
  loss_chunk_size: int = 0

  def __post_init__(self):
    for name in ("embedding_chunk_size", "loss_chunk_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"ChunkConfig.{name}={getattr(self, name)} must be >= 0 (0: off).")

  def check(self, batch_size: int, num_shards: int) -> None:
    """Raises ValueError unless each chunk size divides the per-device batch.

    Args:
      batch_size: the global batch B.
      num_shards: the size of the data axis the batch is split over.
    """
    local = batch_size // num_shards
    for name, macro in (("embedding_chunk_size", "EMBEDDING_CHUNK_SIZE"),
                        ("loss_chunk_size", "LOSS_CHUNK_SIZE")):
      size = getattr(self, name)
      if size and local % size:
        raise ValueError(
            f"ChunkConfig.{name}={size} ({macro}) does not divide the {local} examples per "
            f"device (batch {batch_size} over {num_shards} data shards); use a divisor of "
            f"{local}, or 0 for off.")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the config: step, parameters, optimizer state.

  Attributes:
    step: [] int32, the number of optimizer steps taken.
    params: {"model": DualEncoder params, "loss": {"log_temperature": [] float32} or {}}.
    opt_state: the optax state for `params`.
  """

  step: Array
  params: PyTree
  opt_state: PyTree


def model_inputs(batch: dict[str, Array], loss_config: losses.LossConfig
                 ) -> tuple[Array, Array, Array | None]:
  """(queries [B, Lq], passages [B, Lp], negatives [B, N, Lp] or None) from a batch."""
  loss_config.check_features(batch, "the batch")
  negatives = batch.get(features.NEGATIVES) if loss_config.use_hard_negatives else None
  return batch[features.QUERIES], batch[features.PASSAGES], negatives


def temperature_of(params: PyTree, loss_config: losses.LossConfig) -> Array | float:
  """The loss temperature: learned (exp of params["loss"]["log_temperature"]) or fixed."""
  if loss_config.learn_temperature:
    return jnp.exp(params["loss"]["log_temperature"])
  return loss_config.temperature


def embedding_loss(embeddings: tuple[Array, Array, Array | None], loss_params: PyTree,
                   batch: dict[str, Array], *, loss_config: losses.LossConfig, mesh: Mesh | None,
                   loss_chunk_size: int = 0) -> tuple[Array, dict[str, Array]]:
  """The contrastive loss of a global batch's embeddings.

  Args:
    embeddings: (q [B, P], p [B, P], n [B, N, P] or None), as the DualEncoder returns them.
    loss_params: params["loss"] ({"log_temperature": []} when learned, else {}).
    batch: the batch (its query_ids / passage_ids, when `mask_duplicates`).
    loss_config: the loss.
    mesh: as in `loss_and_metrics`.
    loss_chunk_size: anchors per block of each device's rows (`ChunkConfig.loss_chunk_size`).

  Returns:
    (loss [], metrics) as in `losses.contrastive_loss`.
  """
  q, p, n = embeddings
  loss_kwargs = dict(temperature=temperature_of({"loss": loss_params}, loss_config),
                     same_tower_negatives=loss_config.same_tower_negatives,
                     bidirectional=loss_config.bidirectional, row_chunk_size=loss_chunk_size)
  if loss_config.mask_duplicates and features.QUERY_IDS in batch:
    loss_kwargs.update(query_ids=batch[features.QUERY_IDS],
                       document_ids=batch[features.PASSAGE_IDS])
  if mesh is None:
    return losses.contrastive_loss(q, p, n, **loss_kwargs)
  return losses.sharded_contrastive_loss(mesh, q, p, n, **loss_kwargs)


def loss_and_metrics(params: PyTree, batch: dict[str, Array], *, model: dual_encoder.DualEncoder,
                     loss_config: losses.LossConfig, mesh: Mesh | None,
                     dropout_rng: Array | None = None, loss_chunk_size: int = 0
                     ) -> tuple[Array, dict[str, Array]]:
  """The mean contrastive loss of a global batch and its metric sums.

  Args:
    params: {"model": ..., "loss": ...}.
    batch: global arrays, queries [B, Lq], passages [B, Lp], optionally negatives [B, N, Lp],
      query_ids [B], passage_ids [B].
    model: the DualEncoder.
    loss_config: the loss.
    mesh: the mesh the batch is sharded over; the loss runs under `shard_map` on its data axis.
      None: the global-view loss (the reference the sharded step is tested against).
    dropout_rng: key for dropout; None runs the model deterministically.
    loss_chunk_size: anchors per block of each device's rows (`ChunkConfig.loss_chunk_size`).

  Returns:
    (loss [], metrics): metrics as in `losses.contrastive_loss` (sums and counts).
  """
  queries, passages, negatives = model_inputs(batch, loss_config)
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  embeddings = model.apply({"params": params["model"]}, queries, passages, negatives,
                           deterministic=dropout_rng is None, rngs=rngs)
  return embedding_loss(embeddings, params["loss"], batch, loss_config=loss_config, mesh=mesh,
                        loss_chunk_size=loss_chunk_size)


def cached_gradients(params: PyTree, batch: dict[str, Array], *, model: dual_encoder.DualEncoder,
                     loss_config: losses.LossConfig, mesh: Mesh | None, chunks: ChunkConfig,
                     dropout_rng: Array | None = None) -> tuple[dict[str, Array], PyTree]:
  """The metrics and gradients of `loss_and_metrics`, by gradient caching.

  1. Embed: each device encodes its rows `c = chunks.embedding_chunk_size` at a time
     (`lax.map`, no gradient, so no activations are kept): [B, P] embeddings.
  2. Loss: the (sharded, optionally row-chunked) loss of the embeddings, and its gradient with
     respect to them and to params["loss"] (the temperature).
  3. Re-encode: each chunk again under `jax.vjp`, its embedding cotangents giving its share of the
     parameter gradients, summed in a `lax.scan` (the program does not grow with the number of
     chunks). Dropout masks are keyed by each example's global row, so step 3 recomputes step 1's
     embeddings.

  Args:
    params, batch, model, loss_config, mesh, dropout_rng: as for `loss_and_metrics`.
    chunks: the chunk sizes; `embedding_chunk_size` > 0 must divide the per-device batch.

  Returns:
    (metrics, grads): the metrics of `loss_and_metrics` and the gradient of its loss w.r.t.
    `params`, up to float summation order.
  """
  queries, passages, negatives = model_inputs(batch, loss_config)
  batch_size = queries.shape[0]
  num_shards = 1 if mesh is None else mesh.shape[partitioning.DATA_AXIS]
  chunks.check(batch_size, num_shards)
  chunk_size = chunks.embedding_chunk_size
  num_chunks = batch_size // num_shards // chunk_size

  def constrain(x, spec):
    return x if mesh is None else lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  # Chunk k holds rows k*c .. (k+1)*c - 1 of every device's shard ([num_chunks, D * c, ...],
  # sharded over the data axis on dim 1), so each device encodes only its own rows.
  def to_chunks(x):  # [B, ...] -> [num_chunks, D * c, ...]
    rest = x.shape[1:]
    x = x.reshape(num_shards, num_chunks, chunk_size, *rest).swapaxes(0, 1)
    return constrain(x.reshape(num_chunks, num_shards * chunk_size, *rest),
                     P(None, partitioning.DATA_AXIS))

  def from_chunks(x):  # [num_chunks, D * c, ...] -> [B, ...]
    rest = x.shape[2:]
    x = x.reshape(num_chunks, num_shards, chunk_size, *rest).swapaxes(0, 1)
    return constrain(x.reshape(batch_size, *rest), P(partitioning.DATA_AXIS))

  inputs = {"queries": queries, "passages": passages,
            "rows": jnp.arange(batch_size, dtype=jnp.int32)}
  if negatives is not None:
    inputs["negatives"] = negatives
  chunked_inputs = jax.tree.map(to_chunks, inputs)
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}

  def embed(model_params, chunk):
    return model.apply({"params": model_params}, chunk["queries"], chunk["passages"],
                       chunk.get("negatives"), deterministic=dropout_rng is None,
                       example_rows=chunk["rows"], rngs=rngs)

  # 1. Embeddings only: nothing is differentiated here, so no activation outlives its chunk.
  embeddings = lax.map(functools.partial(embed, params["model"]), chunked_inputs)
  embeddings = jax.tree.map(from_chunks, embeddings)

  # 2. The loss and its gradient w.r.t. the embeddings and the loss parameters.
  def loss_of(embeddings, loss_params):
    return embedding_loss(embeddings, loss_params, batch, loss_config=loss_config, mesh=mesh,
                          loss_chunk_size=chunks.loss_chunk_size)

  (_, metrics), (embedding_grads, loss_grads) = jax.value_and_grad(
      loss_of, argnums=(0, 1), has_aux=True)(embeddings, params["loss"])

  # 3. Re-encode each chunk and pull its cotangents back to the parameters.
  def accumulate(model_grads, chunk_and_cotangents):
    chunk, cotangents = chunk_and_cotangents
    _, pullback = jax.vjp(lambda model_params: embed(model_params, chunk), params["model"])
    (chunk_grads,) = pullback(cotangents)
    return jax.tree.map(jnp.add, model_grads, chunk_grads), None

  zeros = jax.tree.map(jnp.zeros_like, params["model"])
  model_grads, _ = lax.scan(accumulate, zeros,
                            (chunked_inputs, jax.tree.map(to_chunks, embedding_grads)))
  return metrics, {"model": model_grads, "loss": loss_grads}


def train_step(state: TrainState, batch: dict[str, Array], rng: Array, *,
               model: dual_encoder.DualEncoder, loss_config: losses.LossConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule, trainable: PyTree,
               mesh: Mesh | None, chunks: ChunkConfig = ChunkConfig()
               ) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step. Pure; the trainer jits it once (see `build`).

  Args:
    state: the train state (donated by the jitted form).
    batch: global batch arrays (see `loss_and_metrics`).
    rng: the base key: a [] typed key (`base_key(seed, impl)`, any of `PRNG_IMPLS`) or a raw
      key of the default implementation; this step's dropout key is `fold_in(rng, state.step)`,
      so a resumed run draws exactly the keys of an uninterrupted one.
    model, loss_config, tx, schedule, trainable, mesh, chunks: bound by `build` with
      functools.partial. `chunks.embedding_chunk_size` > 0 computes the gradients by gradient
      caching (`cached_gradients`), otherwise in one pass; the update is the same.

  Returns:
    (new state, metrics): metrics are [] float32: "loss_sum", "num_examples",
    "query_top1_correct" (and "document_top1_correct"), "grad_norm" (of the trainable
    gradients), "learning_rate" (used by this step), "temperature".
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  if chunks.embedding_chunk_size:
    metrics, grads = cached_gradients(state.params, batch, model=model, loss_config=loss_config,
                                      mesh=mesh, chunks=chunks, dropout_rng=dropout_rng)
  else:
    def loss_fn(params):
      return loss_and_metrics(params, batch, model=model, loss_config=loss_config, mesh=mesh,
                              dropout_rng=dropout_rng, loss_chunk_size=chunks.loss_chunk_size)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, metrics = apply_gradients(state, grads, metrics, tx=tx, schedule=schedule,
                                       trainable=trainable)
  metrics["temperature"] = jnp.asarray(temperature_of(state.params, loss_config), jnp.float32)
  return new_state, metrics


def apply_gradients(state: TrainState, grads: PyTree, metrics: dict[str, Array], *,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, trainable: PyTree
                    ) -> tuple[TrainState, dict[str, Array]]:
  """The optimizer update of either model kind's step, and the metrics every step reports.

  Returns:
    (the next TrainState, `metrics` plus "grad_norm" (of the trainable parameters' gradients)
    and "learning_rate" (this step's)).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  trainable_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
  metrics = dict(metrics)
  metrics["grad_norm"] = optax.tree.norm(trainable_grads).astype(jnp.float32)
  metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def batch_spec(global_batch_size: int, task_feature_lengths: dict[str, int], *,
               num_negatives: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a global batch: queries/passages (+negatives) and the duplicate ids.

  Args:
    global_batch_size: B.
    task_feature_lengths: {"queries": Lq, "passages": Lp}.
    num_negatives: N hard negatives per query (0: no "negatives" feature).
  """
  lq, lp = task_feature_lengths[features.QUERIES], task_feature_lengths[features.PASSAGES]
  spec = {features.QUERIES: jax.ShapeDtypeStruct((global_batch_size, lq), jnp.int32),
          features.PASSAGES: jax.ShapeDtypeStruct((global_batch_size, lp), jnp.int32),
          features.QUERY_IDS: jax.ShapeDtypeStruct((global_batch_size,), jnp.int32),
          features.PASSAGE_IDS: jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}
  if num_negatives:
    spec[features.NEGATIVES] = jax.ShapeDtypeStruct((global_batch_size, num_negatives, lp),
                                                    jnp.int32)
  return spec


class Built(NamedTuple):
  """What `build` returns.

  Attributes:
    model: the DualEncoder module.
    tx: the optax transformation; schedule: its learning-rate schedule.
    trainable: pytree of bools over params (False: frozen).
    abstract_state: TrainState of jax.ShapeDtypeStruct, each with its `.sharding`.
    state_shardings: TrainState of NamedSharding.
    batch_shardings: dict of NamedSharding, like `batch_spec`.
    rng_sharding: NamedSharding of the base key (replicated).
    init_state: `init_state(init_key(seed)) -> TrainState`, jitted with out_shardings (never
      builds anything unsharded); a `partitioning.InMesh`.
    train_step: `train_step(state, batch, rng) -> (state, metrics)`, jitted with in/out
      shardings, state donated; a `partitioning.InMesh`. `train_step.lower(abstract_state,
      batch_spec, rng_spec(impl))` lowers it without running (the AOT compile check). Both take a
      key of any implementation (typed keys carry theirs); each implementation compiles once.
  """

  model: dual_encoder.DualEncoder
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: PyTree
  abstract_state: TrainState
  state_shardings: TrainState
  batch_shardings: dict[str, NamedSharding]
  rng_sharding: NamedSharding
  init_state: Any
  train_step: Any


def _opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: PyTree,
                         abstract_params: PyTree, param_shardings: PyTree,
                         mesh: Mesh) -> PyTree:
  """Shardings of the optimizer state: a leaf shaped like its parameter (Adam moments, unfactored
  Adafactor moments) is sharded like it; factored/row/column moments and counters, which are
  small, are replicated."""
  replicated = partitioning.replicated(mesh)

  def like_param(state_leaf, param_leaf, param_sharding):
    if isinstance(state_leaf, optax.MaskedNode):
      return state_leaf  # a frozen leaf under multi_transform: no array, nothing to shard
    if getattr(state_leaf, "shape", None) == param_leaf.shape:
      return param_sharding
    return replicated

  return optax.tree_map_params(tx, like_param, abstract_opt_state, abstract_params,
                               param_shardings, transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _model_initializer(model: dual_encoder.DualEncoder):
  """rng -> the model's boxed variables. Parameter shapes do not depend on the batch or the
  sequence lengths (relative positions are bucketed), so a [1, 8] dummy input suffices."""
  dummy = jnp.zeros((1, 8), jnp.int32)

  def init_variables(rng):
    return model.init({"params": rng, "dropout": rng}, dummy, dummy)

  return init_variables


def abstract_model_params_of(model_config: model_config_lib.DualEncoderConfig, mesh: Mesh
                             ) -> PyTree:
  """The DualEncoder's `params` as jax.ShapeDtypeStruct with their NamedShardings on `mesh`
  (from the logical axis names), without creating any array."""
  init_variables = _model_initializer(dual_encoder.DualEncoder(model_config))
  return partitioning.abstract_sharded(init_variables, mesh, rng_spec(INIT_PRNG_IMPL))["params"]


def build(model_config: model_config_lib.DualEncoderConfig, loss_config: losses.LossConfig,
          optimizer_config: optimizers.OptimizerConfig, mesh: Mesh,
          batch: dict[str, jax.ShapeDtypeStruct], chunks: ChunkConfig = ChunkConfig()) -> Built:
  """Builds the model, optimizer, sharded state layout and the jitted step, running nothing.

  Args:
    model_config: the dual encoder; or a `seq2seq_model.EncoderDecoderModel`, built by
      `seq2seq_step.build` (loss_config and chunks must then be the defaults: they do not apply).
    loss_config: the loss.
    optimizer_config: the optimizer and schedule.
    mesh: a (data, model) mesh, real devices or an AOT topology.
    batch: the global batch layout, from `batch_spec`.
    chunks: gradient caching and loss row chunking (default: off).

  Returns:
    A `Built`. Only shapes are evaluated (`jax.eval_shape`); call `built.init_state(rng)` to
    create the sharded state.

  Raises:
    ValueError: if a chunk size does not divide the per-device batch; for the encoder-decoder,
      if `loss_config` or `chunks` sets a dual-encoder option it would ignore
      (`model_kinds.EncoderDecoderKind.check_options`).
  """
  model_kinds.of(model_config).check_options(loss=loss_config, chunks=chunks)
  if model_kinds.is_seq2seq(model_config):  # the encoder-decoder: its own step, same Built
    from samtone_jax import seq2seq_step  # pylint: disable=g-import-not-at-top
    return seq2seq_step.build(model_config, optimizer_config, mesh, batch)
  chunks.check(batch[features.QUERIES].shape[0], mesh.shape[partitioning.DATA_AXIS])
  model = dual_encoder.DualEncoder(model_config)
  init_variables = _model_initializer(model)
  abstract_model_params = abstract_model_params_of(model_config, mesh)
  model_param_shardings = jax.tree.map(lambda a: a.sharding, abstract_model_params)
  replicated = partitioning.replicated(mesh)
  loss_params = ({"log_temperature": jax.ShapeDtypeStruct((), jnp.float32)}
                 if loss_config.learn_temperature else {})
  abstract_params = {"model": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                           abstract_model_params),
                     "loss": loss_params}
  param_shardings = {"model": model_param_shardings,
                     "loss": jax.tree.map(lambda _: replicated, loss_params)}

  trainable = {"model": dual_encoder.trainable_mask(model_config, abstract_model_params),
               "loss": jax.tree.map(lambda _: True, loss_params)}

  def init_params(rng):
    variables = nn.meta.unbox(init_variables(rng))
    return {"model": variables["params"],
            "loss": ({"log_temperature": jnp.log(jnp.float32(loss_config.temperature))}
                     if loss_config.learn_temperature else {})}

  return assemble(model, optimizer_config, mesh, batch, abstract_params=abstract_params,
                  param_shardings=param_shardings, trainable=trainable, init_params=init_params,
                  step=functools.partial(train_step, model=model, loss_config=loss_config,
                                         mesh=mesh, chunks=chunks))


def assemble(model: Any, optimizer_config: optimizers.OptimizerConfig, mesh: Mesh,
             batch: dict[str, jax.ShapeDtypeStruct], *, abstract_params: PyTree,
             param_shardings: PyTree, trainable: PyTree, init_params: Any, step: Any) -> Built:
  """The part of `build` both model kinds share (`seq2seq_step.build` calls it too): the optimizer,
  the sharded train-state layout and the jitted, sharded, donated init and step.

  Args:
    model: what `Built.model` holds (the trainer's evaluation dispatches on it).
    optimizer_config: the optimizer and schedule.
    mesh: a (data, model) mesh, real devices or an AOT topology.
    batch: the global batch layout.
    abstract_params: {"model": ..., "loss": ...} of jax.ShapeDtypeStruct (no shardings).
    param_shardings: the same tree of NamedSharding.
    trainable: the same tree of bools (False: frozen, no update and no optimizer state).
    init_params: rng -> the params tree, created inside the jitted initialiser.
    step: `step(state, batch, rng, *, tx, schedule, trainable) -> (state, metrics)`, pure.

  Returns:
    A `Built`; nothing is created until `init_state` is called.
  """
  replicated = partitioning.replicated(mesh)
  tx, schedule = optimizers.make_optimizer(optimizer_config, trainable,
                                           stacked=t5.stacked_mask(abstract_params))
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = _opt_state_shardings(tx, abstract_opt_state, abstract_params, param_shardings,
                                       mesh)
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                              opt_state=abstract_opt_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_shardings)

  def init_state(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  step_fn = functools.partial(step, tx=tx, schedule=schedule, trainable=trainable)
  batch_shardings = {k: partitioning.data_sharding(mesh, len(v.shape)) for k, v in batch.items()}
  jitted_init = partitioning.InMesh(
      jax.jit(init_state, in_shardings=replicated, out_shardings=state_shardings), mesh)
  jitted_step = partitioning.InMesh(
      jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
              out_shardings=(state_shardings, replicated), donate_argnums=(0,)), mesh)
  return Built(model=model, tx=tx, schedule=schedule, trainable=trainable,
               abstract_state=abstract_state, state_shardings=state_shardings,
               batch_shardings=batch_shardings, rng_sharding=replicated, init_state=jitted_init,
               train_step=jitted_step)


# PRNG implementations a run can draw its dropout masks with (PRNG_IMPL in gin/runs/*.gin); see
# `DEFAULT_PRNG_IMPL` for the trade-offs.
PRNG_IMPLS: tuple[str, ...] = ("threefry2x32", "rbg", "unsafe_rbg")
# The training default (PRNG_IMPL in gin/runs/pretrain.gin) is "threefry2x32", the only one of the
# three that keeps a run bit-reproducible across restarts, host counts and mesh shapes *and*
# gradient-cache chunkings and platforms (measured; benchmarks/README.md "step_efficiency.py"):
#   * "rbg" (t5x's `use_hardware_rng` choice) draws bits with XLA's RngBitGenerator, the TPU's
#     hardware generator, and derives keys with threefry. It is reproducible across restarts and
#     mesh shapes, but: its bits differ between CPU, GPU and TPU; `vmap` over rbg keys draws all
#     rows from the first row's key (JAX's RngBitGenerator batching rule), so a mask follows the
#     row in the batch or gradient-cache chunk, not the example (EMBEDDING_CHUNK_SIZE > 0 then
#     draws other masks than the plain step, and they change with the data-axis size); on CPU it
#     was no faster (tiny, batch 64: 0.94 vs 0.90 s/step on one device, 2x slower on 8) though it
#     moves less memory (2.10 vs 2.95 GB per step); and its gradient-cached step, read back from
#     the persistent compilation cache, deadlocked XLA:CPU's collectives on 8 devices (twice).
#     It is the choice to try on TPU, where the bits come from hardware.
#   * "unsafe_rbg" also derives keys with RngBitGenerator: the fastest on CPU (0.42 s/step, no
#     while-loops) but its fold_in collides: some (step, layer, site) pairs draw identical masks.
# The costliest threefry work is the [b, h, l, l] attention-weight mask; ATTENTION_DROPOUT_RATE=0
# removes it (and takes the fused attention path) with any implementation.
DEFAULT_PRNG_IMPL = "threefry2x32"
# Parameter initialisation always uses threefry2x32: it runs once, so speed does not matter, and
# threefry is the one implementation whose values are identical on CPU, GPU and TPU, so a seed
# initialises the same model everywhere, whatever PRNG_IMPL the steps use.
INIT_PRNG_IMPL = "threefry2x32"


def check_prng_impl(impl: str) -> None:
  """Raises ValueError naming PRNG_IMPL unless `impl` is one of `PRNG_IMPLS`."""
  if impl not in PRNG_IMPLS:
    raise ValueError(f"PRNG_IMPL = {impl!r} (trainer.train.prng_impl): expected one of "
                     f"{', '.join(map(repr, PRNG_IMPLS))}.")


def base_key(seed: int, impl: str = DEFAULT_PRNG_IMPL) -> Array:
  """The typed key [] of `impl` from `seed` (`jax.random.key`); its impl travels with it."""
  check_prng_impl(impl)
  return jax.random.key(seed, impl=impl)


def init_key(seed: int) -> Array:
  """The typed key [] that initialises parameters from `seed` (always `INIT_PRNG_IMPL`).

  Its bits equal `jax.random.PRNGKey(seed)`'s, so initial parameters are those of earlier runs.
  """
  return jax.random.key(seed, impl=INIT_PRNG_IMPL)


def rng_spec(impl: str = DEFAULT_PRNG_IMPL) -> jax.ShapeDtypeStruct:
  """The base key's abstract value: a [] typed key of `impl` (`base_key(seed, impl)`)."""
  check_prng_impl(impl)
  return jax.eval_shape(functools.partial(jax.random.key, impl=impl), 0)


def as_global_batch(local_batch: dict[str, np.ndarray], batch_shardings: dict[str, NamedSharding]
                    ) -> dict[str, Array]:
  """Assembles each host's numpy batch into global jax.Arrays sharded over the data axis.

  Features absent from `batch_shardings` (not used by the step) are dropped.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k, sharding in batch_shardings.items()}
