"""`--gin.SEED` sets model init, dropout and data order together (issue 16).

Reference: a one-step run of the real demo experiment through gin with SEED=1 equals the step
composed by hand from its three seeded parts (`trainer.initial_state(seed)`, the first batch
of `trainer.input_iterator(seed)`, dropout key `PRNGKey(seed)`); and each part changes when the
seed does.
"""

import gin
import jax
import numpy as np
import pytest

from samtone_jax import gin_config
from samtone_jax import train_step as ts
from samtone_jax import trainer

EXPERIMENT = "experiments/demo_samtone.gin"
OVERRIDES = ("TRAIN_STEPS = 1", "BATCH_SIZE = 8",
             'TASK_FEATURE_LENGTHS = {"queries": 8, "passages": 16}', "EVAL_TASKS = []",
             "WARMUP_STEPS = 1", "DROPOUT_RATE = 0.3", "config.T5Config.num_layers = 1",
             "trainer.LoopConfig.checkpoint_period = 1")

pytestmark = pytest.mark.usefixtures("fast_compile")


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_seed_sets_init_dropout_and_data_order(tmp_path):
  try:
    result = gin_config.run_from_gin(
        [EXPERIMENT], [f'MODEL_DIR = "{tmp_path / "run"}"', "SEED = 1", *OVERRIDES],
        keep_config=True)
    model = gin.get_configurable("samtone_jax.models.config.DualEncoderConfig")()
    data = gin.get_configurable(trainer.DataConfig)()
  finally:
    gin.clear_config()
  built = result.built
  trained = _host(result.state.params)

  def batch(seed):
    return next(trainer.input_iterator(data, seed, 0))

  def one_step(init_seed, data_seed, dropout_seed):
    state = trainer.initial_state(built, init_seed, model, None)
    rng = jax.device_put(jax.random.PRNGKey(dropout_seed), built.rng_sharding)
    state, _ = built.train_step(state, ts.as_global_batch(batch(data_seed), built.batch_shardings),
                                rng)
    return _host(state.params)

  # The run is exactly the composition of the three parts, each from SEED = 1.
  jax.tree.map(np.testing.assert_array_equal, trained, one_step(1, 1, 1))
  # And each part moves with the seed: initialisation, data order, dropout.
  init0 = _host(trainer.initial_state(built, 0, model, None).params)
  init1 = _host(trainer.initial_state(built, 1, model, None).params)
  assert not np.allclose(init0["model"]["projection"]["kernel"],
                         init1["model"]["projection"]["kernel"])
  assert not np.array_equal(batch(0)["queries"], batch(1)["queries"])
  np.testing.assert_array_equal(batch(1)["queries"], batch(1)["queries"])
  other_dropout = one_step(1, 1, 0)
  assert not np.allclose(other_dropout["model"]["projection"]["kernel"],
                         trained["model"]["projection"]["kernel"])
