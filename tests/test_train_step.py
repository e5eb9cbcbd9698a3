"""train_step: one sharded step equals a hand computation and the 1-device step.

The reference is written independently of `train_step.train_step`: the global-view loss
(`losses.contrastive_loss` on the model outputs, no shard_map), `jax.grad` of it, and optax's
clip + AdamW applied by hand.
"""

import jax
import numpy as np
import optax
import pytest

from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.models import config as model_config
from samtone_jax.models import dual_encoder

ENCODER = model_config.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, dropout_rate=0.1)
LENGTHS = {"queries": 8, "passages": 12}
BATCH = 8


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _batch(spec, seed=0):
  rng = np.random.default_rng(seed)
  batch = {k: rng.integers(1, ENCODER.vocab_size, v.shape).astype(np.int32)
           for k, v in spec.items()}
  batch["query_ids"] = np.arange(BATCH, dtype=np.int32)
  batch["passage_ids"] = np.arange(BATCH, dtype=np.int32) + 100
  batch["query_ids"][3] = batch["query_ids"][5]  # a repeated question: masked in the loss
  return batch


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_learning_rate_schedule_matches_formula():
  linear = optimizers.learning_rate_schedule(optimizers.OptimizerConfig(
      learning_rate=1.0, warmup_steps=10, decay="linear", decay_steps=110, end_learning_rate=0.1))
  rsqrt = optimizers.learning_rate_schedule(optimizers.OptimizerConfig(
      learning_rate=1.0, warmup_steps=16, decay="rsqrt"))
  for step in [0, 4, 9, 10, 60, 110, 500]:
    want = (step + 1) / 10 if step < 10 else 1.0 + (0.1 - 1.0) * min((step - 10) / 100, 1.0)
    np.testing.assert_allclose(float(linear(step)), want, rtol=1e-6)
    want = (step + 1) / 16 if step < 16 else np.sqrt(16 / step)
    np.testing.assert_allclose(float(rsqrt(step)), want, rtol=1e-6)


def test_sharded_step_equals_hand_computation_and_one_device_step():
  cfg = model_config.DualEncoderConfig(encoder=ENCODER, projection_dim=16, tower_sharing="sde")
  loss_config = losses.LossConfig(temperature=0.05, same_tower_negatives=True, bidirectional=True,
                                  use_hard_negatives=True)
  opt = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=4,
                                   decay="linear", decay_steps=20, grad_clip_norm=0.5,
                                   weight_decay=0.01)
  spec = ts.batch_spec(BATCH, LENGTHS, num_negatives=2)
  batch = _batch(spec)
  rng = jax.random.PRNGKey(7)

  mesh = partitioning.create_mesh(4, 2)
  built = ts.build(cfg, loss_config, opt, mesh, spec)
  state0 = built.init_state(jax.random.PRNGKey(0))
  params0 = jax.tree.map(np.array, jax.device_get(state0.params))  # copies (state0 is donated)
  # Parameters are created sharded: e.g. the MLP input kernel is split over the model axis.
  mlp = state0.params["model"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert mlp.sharding.spec == jax.sharding.PartitionSpec(None, "model")

  state1, metrics = built.train_step(state0, ts.as_global_batch(batch, built.batch_shardings),
                                     rng)
  params1 = _host(state1.params)

  # Hand computation: global-view loss on the model outputs, jax.grad, optax by hand.
  model = dual_encoder.DualEncoder(cfg)
  dropout_rng = jax.random.fold_in(rng, 0)

  def reference_loss(params):
    q, p, n = model.apply({"params": params["model"]}, batch["queries"], batch["passages"],
                          batch["negatives"], deterministic=False, rngs={"dropout": dropout_rng})
    return losses.contrastive_loss(q, p, n, temperature=0.05, same_tower_negatives=True,
                                   bidirectional=True, query_ids=batch["query_ids"],
                                   document_ids=batch["passage_ids"])

  # Jitted: op by op, the reference took 21 s of the test's 54 (one compile per primitive).
  (loss, ref_metrics), grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params0)
  np.testing.assert_allclose(float(metrics["loss_sum"]) / BATCH, float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["query_top1_correct"]),
                             float(ref_metrics["query_top1_correct"]))
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                             rtol=1e-4)
  lr0 = 1e-2 * 1 / 4  # warmup: (step + 1) / warmup_steps
  np.testing.assert_allclose(float(metrics["learning_rate"]), lr0, rtol=1e-6)
  reference_tx = optax.chain(optax.clip_by_global_norm(0.5),
                             optax.adamw(lr0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
  updates, _ = reference_tx.update(grads, reference_tx.init(params0), params0)
  want = optax.apply_updates(params0, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params1,
               _host(want))
  assert int(state1.step) == 1

  # The same two steps on one device give the same parameters.
  state2, _ = built.train_step(state1, ts.as_global_batch(_batch(spec, 1), built.batch_shardings),
                               rng)
  one_mesh = partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
  one = ts.build(cfg, loss_config, opt, one_mesh, spec)
  s = one.init_state(jax.random.PRNGKey(0))
  for seed in (0, 1):
    s, _ = one.train_step(s, ts.as_global_batch(_batch(spec, seed), one.batch_shardings), rng)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _host(state2.params), _host(s.params))


def test_frozen_embedder_gets_no_update_and_no_state():
  cfg = model_config.DualEncoderConfig(encoder=ENCODER, projection_dim=16,
                                       tower_sharing="ade_fte")
  spec = ts.batch_spec(BATCH, LENGTHS)
  mesh = partitioning.create_mesh(8, 1)
  built = ts.build(cfg, losses.LossConfig(learn_temperature=True),
                   optimizers.OptimizerConfig(name="adafactor", warmup_steps=1,
                                              weight_decay=0.1), mesh, spec)
  state0 = built.init_state(jax.random.PRNGKey(0))
  # Copies: the step donates (deletes) state0's buffers.
  embedding0 = np.array(state0.params["model"]["token_embedder"]["embedding"])
  kernel0 = np.array(state0.params["model"]["query_projection"]["kernel"])
  temperature0 = float(state0.params["loss"]["log_temperature"])
  state1, _ = built.train_step(state0, ts.as_global_batch(_batch(spec), built.batch_shardings),
                               jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(state1.params["model"]["token_embedder"]["embedding"]),
                                embedding0)
  # Everything else moves, the learned temperature included.
  assert float(state1.params["loss"]["log_temperature"]) != temperature0
  query_kernel = state1.params["model"]["query_projection"]["kernel"]
  assert not np.array_equal(np.asarray(query_kernel), kernel0)
  # No optimizer state for the frozen leaf: only MaskedNode placeholders where it would be.
  frozen_state = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state1.opt_state)
                  if "token_embedder" in jax.tree_util.keystr(path)]
  assert frozen_state == []
