"""The pure training step of the encoder-decoder (SKILL), built like the dual encoder's.

`train_step.build` hands an `EncoderDecoderModel` here (its one model-kind dispatch); the result
is the same `train_step.Built` (same `TrainState`, same `partitioning.InMesh`, same optimizer-state sharding
rule), so the trainer, checkpoints, resume, SIGTERM and the AOT compile need no second path.

The optimised tree is `{"model": <EncoderDecoder params>, "loss": {}}` (no loss parameters), so a
checkpoint has the dual encoder's layout. Gradient caching and loss row chunking are contrastive-
loss options and do not apply: `train_step.build` refuses them (and a non-default `LossConfig`)
for this model kind (`model_kinds.EncoderDecoderKind.check_options`) rather than ignore them.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as train_step_lib
from samtone_jax.models import seq2seq_model
from samtone_jax.models import t5

Array = jax.Array


def abstract_model_params_of(model: seq2seq_model.EncoderDecoderModel, mesh: Mesh):
  """The EncoderDecoder's `params` as jax.ShapeDtypeStruct with their NamedShardings on `mesh`
  (from the logical axis names), without creating any array."""
  return partitioning.abstract_sharded(
      model.init_variables, mesh, train_step_lib.rng_spec(train_step_lib.INIT_PRNG_IMPL))["params"]


def train_step(state: train_step_lib.TrainState, batch: dict[str, Array], rng: Array, *,
               model: seq2seq_model.EncoderDecoderModel, tx: optax.GradientTransformation,
               schedule: optax.Schedule, trainable
               ) -> tuple[train_step_lib.TrainState, dict[str, Array]]:
  """One optimizer step on the token cross-entropy. Pure; jitted once by `build`.

  Args:
    state: the train state (donated by the jitted form).
    batch: global EncDecFeatureConverter arrays, each [B, L] (see `seq2seq_model`).
    rng: the base key (a typed key of PRNG_IMPL, `train_step.base_key`); this step's dropout key is `fold_in(rng, state.step)`, as in the
      dual encoder's step, so a resumed run draws the keys of an uninterrupted one.
    model, tx, schedule, trainable: bound by `build`.

  Returns:
    (new state, metrics): [] float32 sums and counts of `losses.seq2seq_loss` ("loss_sum",
    "num_examples", "num_tokens", "token_correct", ...), "grad_norm", "learning_rate".
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    return model.loss_and_metrics(params["model"], batch, dropout_rng)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return train_step_lib.apply_gradients(state, grads, metrics, tx=tx, schedule=schedule,
                                        trainable=trainable)


def build(model: seq2seq_model.EncoderDecoderModel,
          optimizer_config: optimizers.OptimizerConfig, mesh: Mesh,
          batch: dict[str, jax.ShapeDtypeStruct]) -> train_step_lib.Built:
  """`train_step.build` for the encoder-decoder: sharded init and jitted, donated step.

  Args:
    model: the encoder-decoder and its loss.
    optimizer_config: the optimizer and schedule.
    mesh: a (data, model) mesh.
    batch: the global batch layout, from `model.batch_spec`.

  Returns:
    A `train_step.Built` whose `model` is `model` (the trainer's evaluation dispatches on it).
  """
  abstract_model_params = abstract_model_params_of(model, mesh)
  replicated = NamedSharding(mesh, P())
  abstract_params = {"model": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                           abstract_model_params),
                     "loss": {}}
  param_shardings = {"model": jax.tree.map(lambda a: a.sharding, abstract_model_params),
                     "loss": {}}
  trainable = {"model": model.trainable_mask(abstract_params["model"]), "loss": {}}
  tx, schedule = optimizers.make_optimizer(optimizer_config, trainable,
                                           stacked=t5.stacked_mask(abstract_params))
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = train_step_lib._opt_state_shardings(  # pylint: disable=protected-access
      tx, abstract_opt_state, abstract_params, param_shardings, mesh)
  state_shardings = train_step_lib.TrainState(step=replicated, params=param_shardings,
                                              opt_state=opt_shardings)
  abstract_state = train_step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                             params=abstract_params, opt_state=abstract_opt_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_shardings)

  def init_state(rng):
    params = {"model": nn.meta.unbox(model.init_variables(rng))["params"], "loss": {}}
    return train_step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                     opt_state=tx.init(params))

  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              trainable=trainable)
  batch_shardings = {k: partitioning.data_sharding(mesh, len(v.shape)) for k, v in batch.items()}
  jitted_init = partitioning.InMesh(
      jax.jit(init_state, in_shardings=replicated, out_shardings=state_shardings), mesh)
  jitted_step = partitioning.InMesh(
      jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
              out_shardings=(state_shardings, replicated), donate_argnums=(0,)), mesh)
  return train_step_lib.Built(
      model=model, tx=tx, schedule=schedule, trainable=trainable, abstract_state=abstract_state,
      state_shardings=state_shardings, batch_shardings=batch_shardings, rng_sharding=replicated,
      init_state=jitted_init, train_step=jitted_step)
