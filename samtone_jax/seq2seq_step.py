"""The pure training step of the encoder-decoder (SKILL), built like the dual encoder's.

`train_step.build` hands an `EncoderDecoderModel` here (its one model-kind dispatch); the result
is the same `train_step.Built`, assembled by the same `train_step.assemble` (optimizer, state
shardings, jitted init and donated step), so the trainer, checkpoints, resume, SIGTERM and the AOT
compile need no second path.

The optimised tree is `{"model": <EncoderDecoder params>, "loss": {}}` (no loss parameters), so a
checkpoint has the dual encoder's layout. Gradient caching and loss row chunking are contrastive-
loss options and do not apply: `train_step.build` refuses them (and a non-default `LossConfig`)
for this model kind (`model_kinds.EncoderDecoderKind.check_options`) rather than ignore them.
"""

import functools

import flax.linen as nn
import jax
from jax.sharding import Mesh
import optax

from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as train_step_lib
from samtone_jax.models import seq2seq_model

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
  abstract_params = {"model": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                           abstract_model_params),
                     "loss": {}}
  param_shardings = {"model": jax.tree.map(lambda a: a.sharding, abstract_model_params),
                     "loss": {}}
  trainable = {"model": model.trainable_mask(abstract_params["model"]), "loss": {}}

  def init_params(rng):
    return {"model": nn.meta.unbox(model.init_variables(rng))["params"], "loss": {}}

  return train_step_lib.assemble(
      model, optimizer_config, mesh, batch, abstract_params=abstract_params,
      param_shardings=param_shardings, trainable=trainable, init_params=init_params,
      step=functools.partial(train_step, model=model))
