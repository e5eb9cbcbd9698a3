"""`losses.seq2seq_loss` against a float64 numpy reference written from the formula, gradients
against `jax.grad` of a one-hot reference, and a (4, 2) mesh against one device."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from samtone_jax import losses
from samtone_jax import partitioning

pytestmark = pytest.mark.usefixtures("fast_compile")

FACTORS = [None, 7.5, "num_real_target_tokens", "num_total_target_tokens",
           "average_per_sequence"]


def _batch(seed=0, b=4, l=6, v=11):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(b, l, v)) * 3).astype(np.float32)
  targets = rng.integers(1, v, size=(b, l)).astype(np.int32)
  for row, n in enumerate([l, 4, 1, 0][:b]):  # The last row is all padding.
    targets[row, n:] = 0
  return logits, targets


def _numpy_loss(logits, targets, weights, factor, z_loss, label_smoothing):
  """float64, from the docstring's formula with explicit soft-target vectors."""
  logits = logits.astype(np.float64)
  b, l, v = logits.shape
  weights = (targets > 0).astype(np.float64) if weights is None else weights.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  log_p = logits - log_z[..., None]
  q = np.full((b, l, v), label_smoothing / (v - 1))
  np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing, axis=-1)
  entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)
  per_token = -np.sum(q * log_p, axis=-1) - entropy + z_loss * log_z**2
  if factor == "average_per_sequence":
    sums = weights.sum(-1, keepdims=True)
    weights = np.where(sums > 0, weights / np.where(sums > 0, sums, 1.0), 0.0)
    normaliser = weights.sum()
  elif factor == "num_real_target_tokens":
    normaliser = weights.sum()
  elif factor == "num_total_target_tokens":
    normaliser = b * l
  elif factor is None:
    normaliser = 1.0
  else:
    normaliser = factor
  return np.sum(per_token * weights) / normaliser


def _jax_reference(logits, targets, factor, z_loss, label_smoothing):
  """Independent jax version (one-hot soft targets, log_softmax) for jax.grad."""
  b, l, v = logits.shape
  weights = (targets > 0).astype(jnp.float32)
  q = jax.nn.one_hot(targets, v) * (1.0 - label_smoothing - label_smoothing / (v - 1)) + (
      label_smoothing / (v - 1))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  per_token = -jnp.sum(q * jax.nn.log_softmax(logits), -1) + z_loss * log_z**2
  if factor == "average_per_sequence":
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
    normaliser = weights.sum()
  elif factor == "num_real_target_tokens":
    normaliser = weights.sum()
  elif factor == "num_total_target_tokens":
    normaliser = b * l
  else:
    normaliser = 1.0 if factor is None else factor
  return jnp.sum(per_token * weights) / normaliser  # The entropy constant has no gradient.


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-2, 0.0), (1e-4, 0.1)])
def test_value_and_gradient_match_references(factor, z_loss, label_smoothing):
  logits, targets = _batch()
  loss, metrics = losses.seq2seq_loss(jnp.asarray(logits), jnp.asarray(targets),
                                      loss_normalizing_factor=factor, z_loss=z_loss,
                                      label_smoothing=label_smoothing)
  expected = _numpy_loss(logits, targets, None, factor, z_loss, label_smoothing)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert abs(expected) > 0.1
  grad = jax.grad(lambda x: losses.seq2seq_loss(
      x, jnp.asarray(targets), loss_normalizing_factor=factor, z_loss=z_loss,
      label_smoothing=label_smoothing)[0])(jnp.asarray(logits))
  expected_grad = jax.grad(_jax_reference)(jnp.asarray(logits), jnp.asarray(targets), factor,
                                           z_loss, label_smoothing)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  # Padding positions get no gradient.
  assert np.all(np.asarray(grad)[targets == 0] == 0)
  # Metrics: sums and counts.
  real = targets > 0
  np.testing.assert_allclose(metrics["loss_sum"] / metrics["num_examples"], expected, rtol=1e-5)
  assert metrics["num_tokens"] == real.sum()
  assert metrics["token_correct"] == ((logits.argmax(-1) == targets) & real).sum()
  np.testing.assert_allclose(
      metrics["cross_entropy_sum"] + metrics["z_loss_sum"],
      _numpy_loss(logits, targets, None, None, z_loss, label_smoothing), rtol=1e-5)


def test_explicit_weights():
  logits, targets = _batch(1)
  weights = np.random.default_rng(2).uniform(size=targets.shape).astype(np.float32)
  weights[targets == 0] = 0
  loss, _ = losses.seq2seq_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                loss_normalizing_factor="average_per_sequence", z_loss=1e-3)
  np.testing.assert_allclose(
      loss, _numpy_loss(logits, targets, weights, "average_per_sequence", 1e-3, 0.0), rtol=1e-5)


def test_all_padding_batch_is_zero_not_nan():
  logits, _ = _batch()
  for factor in FACTORS:
    loss, _ = losses.seq2seq_loss(jnp.asarray(logits), jnp.zeros((4, 6), jnp.int32),
                                  loss_normalizing_factor=factor)
    assert float(loss) == 0.0


def test_sharded_over_a_4x2_mesh_equals_one_device():
  logits, targets = _batch(3, b=8, l=5, v=16)
  mesh = partitioning.create_mesh(4, 2)

  def loss_fn(x, t):
    return losses.seq2seq_loss(x, t, loss_normalizing_factor="num_real_target_tokens",
                               z_loss=1e-3, label_smoothing=0.1)

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grad = jax.jit(value_and_grad)(jnp.asarray(logits), jnp.asarray(targets))
  sharded_logits = jax.device_put(logits, NamedSharding(mesh, P("data", None, "model")))
  sharded_targets = jax.device_put(targets, NamedSharding(mesh, P("data", None)))
  (s_loss, s_metrics), s_grad = jax.jit(value_and_grad)(sharded_logits, sharded_targets)
  assert s_grad.sharding.spec == P("data", None, "model")
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-6, atol=1e-8)
  for k in metrics:
    np.testing.assert_allclose(s_metrics[k], metrics[k], rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_normalizing_factor": "tokens"}, "expected a number, None or one of"),
    ({"loss_normalizing_factor": 0.0}, "must be positive"),
    ({"label_smoothing": 1.0}, r"must be in \[0, 1\)"),
])
def test_bad_arguments(kwargs, message):
  logits, targets = _batch()
  with pytest.raises(ValueError, match=message):
    losses.seq2seq_loss(jnp.asarray(logits), jnp.asarray(targets), **kwargs)
