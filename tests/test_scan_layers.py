"""`T5Config.scan_layers`: the scanned encoder is the unrolled one, in values, gradients, sharding
and training.

The reference is the unrolled encoder (itself checked against HF transformers in
test_hf_import.py) with its `layers_{i}` parameters stacked by `t5.stack_layers`; the training
reference is the unrolled model trained by the same optimizer, which for Adafactor (per-tensor
statistics) only agrees if the scanned model's optimizer treats each layer as its own tensor.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samtone_jax import checkpoints
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.models import config as model_config
from samtone_jax.models import t5

ENCODER = model_config.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                num_heads=4, dropout_rate=0.0)
LENGTHS = {"queries": 8, "passages": 12}
BATCH = 8

pytestmark = pytest.mark.usefixtures("fast_compile")


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, ENCODER.vocab_size, size=(4, 10)).astype(np.int32)
  tokens[1, 6:] = 0
  tokens[3, 2:] = 0
  return jnp.asarray(tokens)


@pytest.mark.parametrize("remat,policy", [(False, "full"), (True, "full"), (True, "dots")])
def test_scanned_encoder_equals_unrolled_values_and_gradients(remat, policy):
  tokens = _tokens()
  unrolled = t5.T5Encoder(ENCODER)
  scanned = t5.T5Encoder(dataclasses.replace(ENCODER, scan_layers=True, remat=remat,
                                             remat_policy=policy))
  params = nn.meta.unbox(unrolled.init(jax.random.PRNGKey(0), tokens))["params"]
  stacked = t5.stack_layers(params)

  # Same tree as the scanned module's own init, with a leading [num_layers] 'layers' axis.
  boxed = scanned.init(jax.random.PRNGKey(0), tokens)["params"]
  assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(stacked)
  kernel = boxed["layers"]["mlp"]["wi_0"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  assert kernel.value.shape == (3, 32, 64)

  want = unrolled.apply({"params": params}, tokens)
  got = scanned.apply({"params": stacked}, tokens)
  _assert_close_to_scale(got, want)

  def loss(module, p):
    return jnp.sum(jnp.sin(module.apply({"params": p}, tokens)))

  # Jitted: op by op (one compile per primitive) the gradients took most of the test's time.
  want_grads = t5.stack_layers(jax.jit(jax.grad(lambda p: loss(unrolled, p)))(params))
  got_grads = jax.jit(jax.grad(lambda p: loss(scanned, p)))(stacked)
  jax.tree.map(_assert_close_to_scale, got_grads, want_grads)


def _assert_close_to_scale(got, want):
  """Equal up to float32 reassociation: the scan sums in another order than the unrolled loop,
  and how far that moves an element depends on the tensor's scale, not the element's own size
  (CI's CPU put a -0.0236 entry of a tensor reaching 20 off by 1.6e-5). A wrong layer, mask or
  transpose moves elements by O(scale)."""
  want = np.asarray(want)
  scale = float(np.max(np.abs(want))) or 1.0
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * scale)


def test_scanned_dropout_differs_per_layer_and_is_reproducible():
  tokens = _tokens()
  config = dataclasses.replace(ENCODER, scan_layers=True, dropout_rate=0.3)
  module = t5.T5Encoder(config)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), tokens))["params"]
  run = lambda key: np.asarray(module.apply({"params": params}, tokens, deterministic=False,
                                            rngs={"dropout": jax.random.PRNGKey(key)}))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), np.asarray(module.apply({"params": params}, tokens)))


def test_stack_and_unstack_layers_round_trip_and_errors():
  tree = {"encoder": {"layers_0": {"w": np.zeros((2, 3))}, "layers_1": {"w": np.ones((2, 3))},
                      "encoder_norm": {"scale": np.ones(2)}},
          "projection": {"kernel": np.ones((2, 2))}}
  stacked = t5.stack_layers(tree)
  assert stacked["encoder"]["layers"]["w"].shape == (2, 2, 3)
  np.testing.assert_array_equal(stacked["encoder"]["layers"]["w"][1], np.ones((2, 3)))
  assert t5.stacked_mask(stacked) == {"encoder": {"layers": {"w": True},
                                                  "encoder_norm": {"scale": False}},
                                      "projection": {"kernel": False}}
  back = t5.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  # Already stacked: unchanged.
  jax.tree.map(np.testing.assert_array_equal, t5.stack_layers(stacked), stacked)
  with pytest.raises(ValueError, match="layers_0 ... layers_"):
    t5.stack_layers({"layers_0": {"w": np.zeros(1)}, "layers_2": {"w": np.zeros(1)}})


def _batch(spec, seed):
  rng = np.random.default_rng(seed)
  batch = {k: rng.integers(1, ENCODER.vocab_size, v.shape).astype(np.int32)
           for k, v in spec.items()}
  batch["query_ids"] = np.arange(BATCH, dtype=np.int32)
  batch["passage_ids"] = np.arange(BATCH, dtype=np.int32) + 100
  return batch


def _state_with(built, params):
  """A fresh TrainState of `built` holding `params` (host numpy), placed with its shardings."""
  params = jax.device_put(params, built.state_shardings.params)
  opt_state = jax.jit(built.tx.init, out_shardings=built.state_shardings.opt_state)(params)
  return ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def test_scanned_model_trains_like_the_unrolled_one_with_adafactor():
  """ADE-FTE (frozen shared embedder + two stacked towers), Adafactor with parameter scaling and
  factored moments, 4x2 mesh, three steps: the scanned run's params equal the unrolled run's."""
  cfg = model_config.DualEncoderConfig(encoder=ENCODER, projection_dim=16,
                                       tower_sharing="ade_fte")
  scan_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(ENCODER, scan_layers=True))
  loss_config = losses.LossConfig(temperature=0.05, same_tower_negatives=True)
  # Factor moments of dims >= 16, so that the [32, 64] kernels are factored.
  opt = optimizers.OptimizerConfig(name="adafactor", learning_rate=1e-2, warmup_steps=2,
                                   decay="constant", grad_clip_norm=1.0,
                                   adafactor_min_dim_size_to_factor=16)
  spec = ts.batch_spec(BATCH, LENGTHS)
  mesh = partitioning.create_mesh(4, 2)
  built = ts.build(cfg, loss_config, opt, mesh, spec)
  scan_built = ts.build(scan_cfg, loss_config, opt, mesh, spec)

  # Stacked params are sharded like their layers, with the layer axis replicated.
  wi = scan_built.abstract_state.params["model"]["query_encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert wi.shape == (3, 32, 64)
  assert wi.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
  params0 = _host(built.init_state(jax.random.PRNGKey(0)).params)
  state = _state_with(built, params0)
  scan_state = _state_with(scan_built, t5.stack_layers(params0))
  rng = jax.random.PRNGKey(3)
  for step in range(3):
    batch = _batch(spec, step)
    state, metrics = built.train_step(state, ts.as_global_batch(batch, built.batch_shardings), rng)
    scan_state, scan_metrics = scan_built.train_step(
        scan_state, ts.as_global_batch(batch, scan_built.batch_shardings), rng)
    np.testing.assert_allclose(float(scan_metrics["loss_sum"]), float(metrics["loss_sum"]),
                               rtol=1e-5)
  want = t5.stack_layers(_host(state.params))
  got = _host(scan_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
  # The frozen shared embedder did not move.
  np.testing.assert_array_equal(got["model"]["token_embedder"]["embedding"],
                                params0["model"]["token_embedder"]["embedding"])
  # The layers moved by different amounts (per-layer Adafactor statistics at work) ...
  moved = np.abs(got["model"]["query_encoder"]["layers"]["mlp"]["wo"]["kernel"]
                 - t5.stack_layers(params0)["model"]["query_encoder"]["layers"]["mlp"]["wo"][
                     "kernel"])
  assert moved.max() > 1e-4

  # ... and treating a stacked kernel as one tensor (plain Adafactor) would not reproduce them.
  tx = optax.adafactor(learning_rate=1e-2 / 2, min_dim_size_to_factor=16, decay_rate=0.8,
                       multiply_by_parameter_scale=True, clipping_threshold=1.0)
  stacked0 = t5.stack_layers(params0)["model"]["query_encoder"]["layers"]
  per_layer = optimizers.per_layer(tx)
  grads = jax.tree.map(lambda x: np.cos(np.arange(x.size, dtype=np.float32).reshape(x.shape)
                                        * (1.0 + np.arange(x.shape[0]).reshape(
                                            (-1,) + (1,) * (x.ndim - 1)))), stacked0)
  whole, _ = tx.update(grads, tx.init(stacked0), stacked0)
  split, _ = per_layer.update(grads, per_layer.init(stacked0), stacked0)
  unrolled = t5.unstack_layers({"layers": stacked0})
  unrolled_grads = t5.unstack_layers({"layers": grads})
  by_layer, _ = tx.update(unrolled_grads, tx.init(unrolled), unrolled)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               split, t5.stack_layers(by_layer)["layers"])
  assert not np.allclose(whole["mlp"]["wo"]["kernel"], split["mlp"]["wo"]["kernel"], rtol=1e-3)


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_restores_into_the_other_layer_layout(tmp_path, saved_scanned):
  """A run saved with one layout initialises (INITIAL_CHECKPOINT_PATH, evaluate) the other."""
  cfg = model_config.DualEncoderConfig(encoder=ENCODER, projection_dim=16, tower_sharing="ade")
  scan_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(ENCODER, scan_layers=True))
  if saved_scanned:
    cfg, scan_cfg = scan_cfg, cfg
  loss_config = losses.LossConfig(temperature=0.05)
  opt = optimizers.OptimizerConfig(name="adafactor")
  spec = ts.batch_spec(BATCH, LENGTHS)
  mesh = partitioning.create_mesh(4, 2)
  built = ts.build(cfg, loss_config, opt, mesh, spec)
  other = ts.build(scan_cfg, loss_config, opt, mesh, spec)
  state = built.init_state(jax.random.PRNGKey(1))
  saved = _host(state.params)
  manager = checkpoints.create_manager(str(tmp_path / "run"))
  checkpoints.save(manager, 5, state, {"step": 5})

  restored = checkpoints.restore_params(str(tmp_path / "run"), other.abstract_state.params)
  convert = t5.unstack_layers if saved_scanned else t5.stack_layers
  want = convert(saved)
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, _host(restored), want)
  # Placed with the target layout's shardings.
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.sharding.spec, b.sharding.spec),
               restored, other.abstract_state.params)
