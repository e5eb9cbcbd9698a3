"""Every PRNG implementation through `train_step.build`: lowering with `rng_spec(impl)` (the AOT
path), running with typed keys, the threefry default equal to the raw `PRNGKey` keys of earlier
runs, and a clear error for an unknown PRNG_IMPL. (Kill-and-resume with threefry and rbg:
tests/test_main.py.)"""

import jax
import numpy as np
import pytest

from samtone_jax import errors
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax import trainer
from samtone_jax.models import config as model_config

pytestmark = pytest.mark.usefixtures("fast_compile")

MODEL = model_config.DualEncoderConfig(
    encoder=model_config.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                  num_heads=4, dropout_rate=0.2),
    projection_dim=8)
BATCH = 8
LENGTHS = {"queries": 4, "passages": 6}


def _built():
  mesh = partitioning.create_mesh()
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=1,
                                         decay="constant")
  return ts.build(MODEL, losses.LossConfig(), optimizer, mesh, ts.batch_spec(BATCH, LENGTHS))


def _batch(built):
  rng = np.random.default_rng(0)
  local = {name: rng.integers(1, 64, size=(BATCH, length)).astype(np.int32)
           for name, length in LENGTHS.items()}
  local["query_ids"] = local["passage_ids"] = np.arange(BATCH, dtype=np.int32)
  return ts.as_global_batch(local, built.batch_shardings)


def _two_steps(built, rng):
  state = built.init_state(ts.init_key(0))
  losses = []
  for _ in range(2):
    state, metrics = built.train_step(state, _batch(built), rng)
    losses.append(float(metrics["loss_sum"]))
  return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def built():
  return _built()


@pytest.mark.parametrize("impl", ts.PRNG_IMPLS)
def test_every_implementation_lowers_from_its_spec_and_trains(built, impl):
  spec = ts.rng_spec(impl)
  spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=built.rng_sharding)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
           for k, v in _batch(built).items()}
  # What aot.py compiles: the step lowers from the abstract key of this implementation (before
  # typed keys, build hard-coded [2] uint32 keys and rbg's [4] failed here).
  assert built.train_step.lower(built.abstract_state, batch, spec).as_text()
  losses, _ = _two_steps(built, jax.device_put(ts.base_key(1, impl), built.rng_sharding))
  assert np.all(np.isfinite(losses))
  # Dropout is drawn: another seed gives another first-step loss (same init, same batch).
  other, _ = _two_steps(built, jax.device_put(ts.base_key(2, impl), built.rng_sharding))
  assert other[0] != losses[0]


def test_threefry_typed_key_trains_like_the_raw_keys_of_earlier_runs(built):
  typed_losses, typed_params = _two_steps(
      built, jax.device_put(ts.base_key(1, "threefry2x32"), built.rng_sharding))
  raw_losses, raw_params = _two_steps(built, jax.device_put(jax.random.PRNGKey(1),
                                                             built.rng_sharding))
  np.testing.assert_array_equal(typed_losses, raw_losses)
  jax.tree.map(np.testing.assert_array_equal, typed_params, raw_params)
  assert ts.DEFAULT_PRNG_IMPL == "threefry2x32"


def test_unknown_prng_impl_is_a_config_error_before_anything_is_written(tmp_path):
  data = trainer.DataConfig(mixture_or_task_name="demo_manpages", task_feature_lengths=LENGTHS,
                            batch_size=BATCH)
  with pytest.raises(errors.ConfigError, match=r"PRNG_IMPL = 'philox'.*'threefry2x32'"):
    trainer.train(model_dir=str(tmp_path / "run"), model=MODEL, loss=losses.LossConfig(),
                  optimizer=optimizers.OptimizerConfig(), data=data,
                  loop=trainer.LoopConfig(train_steps=1), prng_impl="philox")
  assert not (tmp_path / "run").exists()
