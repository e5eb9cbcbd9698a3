"""Fused attention, the separate attention-dropout rate and the one-hot embedding lookup.

* `jax.nn.dot_product_attention` (taken when no mask is applied to the attention weights) equals
  the einsum path and an independent formula, in values and gradients, with padding.
* `attention_dropout_rate` switches only the attention-weight mask; None follows dropout_rate.
* The one-hot matmul lookup equals `jnp.take`, in values and in the table's gradient.
* The CPU forms of the step (dense layers as 2-D products, the position-bias gradient as a
  product with ones, dropout masks in 16-bit blocks) equal their formulas.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samtone_jax.models import config as model_config_lib
from samtone_jax.models import t5

pytestmark = pytest.mark.usefixtures("fast_compile")

B, L, D, H, K = 3, 7, 16, 4, 8
# A rate that keeps every weight: bernoulli(1 - 1e-12) is always True in float32 and x / (1 -
# 1e-12) == x, so the einsum path runs with an identity mask.
IDENTITY_RATE = 1e-12


def _config(**kwargs) -> model_config_lib.T5Config:
  return model_config_lib.T5Config(vocab_size=50, d_model=D, d_kv=K, d_ff=32, num_layers=2,
                                   num_heads=H, **kwargs)


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  position_bias = jnp.asarray(rng.normal(size=(1, H, L, L)), jnp.float32)
  lengths = np.array([L, 4, 1])  # a full row, a padded row, a row with one real key
  key_mask = np.arange(L)[None, :] < lengths[:, None]
  mask_bias = jnp.asarray(np.where(key_mask, 0.0, np.finfo(np.float32).min)[:, None, None, :],
                          jnp.float32)
  keys = t5.fold_in_rows(jax.random.key(3), jnp.arange(B))
  return x, position_bias, mask_bias, keys, key_mask


def _reference_attention(params, x, position_bias, key_mask):
  """T5 attention from the formula: softmax(q k^T + bias) v over real keys, no scaling."""
  def heads(name):
    return (x @ params[name]["kernel"]).reshape(B, L, H, K)
  q, k, v = heads("query"), heads("key"), heads("value")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") + position_bias
  logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest").reshape(B, L, H * K)
  return out @ params["out"]["kernel"]


def test_fused_attention_equals_einsum_and_formula_in_values_and_gradients():
  x, position_bias, mask_bias, keys, key_mask = _inputs()
  fused = t5.SelfAttention(_config(dropout_rate=0.1, attention_dropout_rate=0.0))
  einsum = t5.SelfAttention(_config(dropout_rate=0.1, attention_dropout_rate=IDENTITY_RATE))
  params = nn.meta.unbox(fused.init(jax.random.key(0), x, position_bias, mask_bias, None))[
      "params"]

  def apply_fused(params, x, position_bias):
    # Dropout keys given (a training pass), but attention dropout 0: the fused path.
    return fused.apply({"params": params}, x, position_bias, mask_bias, keys)

  def apply_einsum(params, x, position_bias):
    return einsum.apply({"params": params}, x, position_bias, mask_bias, keys)

  def apply_reference(params, x, position_bias):
    return _reference_attention(params, x, position_bias, key_mask)

  outputs = {name: f(params, x, position_bias) for name, f in
             [("fused", apply_fused), ("einsum", apply_einsum), ("reference", apply_reference)]}
  np.testing.assert_allclose(outputs["fused"], outputs["einsum"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outputs["fused"], outputs["reference"], rtol=1e-5, atol=1e-5)

  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=outputs["fused"].shape),
                          jnp.float32)
  def loss(f):
    return lambda *args: jnp.sum(f(*args) * cotangent)
  # Also the position bias's gradient: the model sums it over the batch as ones @ [b, h*l*l] on
  # CPU (t5.broadcast_over_batch), the reference by broadcasting.
  grads = {name: jax.grad(loss(f), argnums=(0, 1, 2))(params, x, position_bias) for name, f in
           [("fused", apply_fused), ("einsum", apply_einsum), ("reference", apply_reference)]}
  for other in ("einsum", "reference"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 grads["fused"], grads[other])


def test_fused_path_is_taken_exactly_when_no_attention_mask_is_drawn():
  x, position_bias, mask_bias, keys, _ = _inputs()

  def jaxpr(config, keys):
    module = t5.SelfAttention(config)
    params = module.init(jax.random.key(0), x, position_bias, mask_bias, None)
    return str(jax.make_jaxpr(lambda p: module.apply(p, x, position_bias, mask_bias, keys))(
        params))

  # Random draws (threefry keys: the hash itself, t5._word_rows) appear only where the
  # attention weights are masked.
  draws = "threefry2x32"
  assert draws not in jaxpr(_config(dropout_rate=0.1, attention_dropout_rate=0.0), keys)
  assert draws not in jaxpr(_config(dropout_rate=0.1), None)  # deterministic
  assert draws in jaxpr(_config(dropout_rate=0.1), keys)  # None: = dropout_rate
  assert draws in jaxpr(_config(dropout_rate=0.0, attention_dropout_rate=0.1), keys)


def test_attention_dropout_rate_switches_only_the_attention_mask():
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(1, 50, size=(B, L)), jnp.int32).at[1, 5:].set(0)
  keys = t5.fold_in_rows(jax.random.key(5), jnp.arange(B))

  def encode(**rates):
    encoder = t5.T5Encoder(_config(**rates))
    params = encoder.init(jax.random.key(0), tokens)
    return encoder.apply(params, tokens, deterministic=False, dropout_keys=keys)

  # The other sites draw the same masks (same keys, same site numbers) whatever the attention
  # rate, so "no attention dropout" equals "an attention mask that keeps everything".
  off = encode(dropout_rate=0.1, attention_dropout_rate=0.0)
  identity = encode(dropout_rate=0.1, attention_dropout_rate=IDENTITY_RATE)
  np.testing.assert_allclose(off, identity, rtol=1e-5, atol=1e-5)
  # The default follows dropout_rate (T5): the attention weights are masked too.
  default = encode(dropout_rate=0.1)
  same_rate = encode(dropout_rate=0.1, attention_dropout_rate=0.1)
  np.testing.assert_array_equal(default, same_rate)
  assert float(jnp.abs(default - off).max()) > 1e-2
  assert model_config_lib.T5Config(dropout_rate=0.2).attention_dropout == 0.2
  assert model_config_lib.T5Config(dropout_rate=0.2,
                                   attention_dropout_rate=0.0).attention_dropout == 0.0
  with pytest.raises(ValueError, match="attention_dropout_rate=1.5"):
    model_config_lib.T5Config(attention_dropout_rate=1.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_equals_take_in_values_and_gradients(dtype):
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 50, size=(B, L)), jnp.int32).at[0, 0].set(49)
  table = {"params": {"embedding": jnp.asarray(rng.normal(size=(50, D)), jnp.float32)}}
  cotangent = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)

  def lookup(one_hot):
    module = t5.Embed(50, D, jnp.dtype(dtype), one_hot)
    def loss(table):
      out = module.apply(table, tokens)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grad = jax.value_and_grad(loss, has_aux=True)(table)
    return out, grad["params"]["embedding"]

  taken, taken_grad = lookup(False)
  one_hot, one_hot_grad = lookup(True)
  assert one_hot.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(one_hot, np.float32), np.asarray(taken, np.float32))
  # Independent reference for the gradient: each token's cotangent added to its row.
  expected = np.zeros((50, D), np.float64)
  np.add.at(expected, np.asarray(tokens).ravel(), np.asarray(cotangent, np.float64).reshape(-1, D))
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(taken_grad, expected, rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(one_hot_grad, expected, rtol=tolerance, atol=tolerance)


def test_one_hot_embedding_encoder_equals_take_encoder():
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 50, size=(B, L)), jnp.int32)
  encoder = t5.T5Encoder(_config(one_hot_embedding=False))
  params = encoder.init(jax.random.key(0), tokens)
  one_hot_encoder = t5.T5Encoder(_config(one_hot_embedding=True))
  np.testing.assert_allclose(one_hot_encoder.apply(params, tokens), encoder.apply(params, tokens),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_drops_at_its_rate_independently_per_row_and_keeps_the_mean(rate):
  """t5.dropout against the binomial law: its 16-bit draw drops round(rate * 2**16) / 2**16."""
  rows, shape = 4, (64, 1024)
  x = jnp.full((rows, *shape), 2.0, jnp.float32)
  keys = t5.fold_in_rows(jax.random.key(7), jnp.arange(rows))
  out = np.asarray(jax.jit(lambda x, k: t5.dropout(x, rate, k, site=1))(x, keys))
  p_drop = round(rate * 2**16) / 2**16
  assert abs(p_drop - rate) <= 2**-17
  dropped = out == 0
  n = dropped[0].size
  for row in range(rows):  # each row's fraction within 5 binomial standard deviations
    assert abs(dropped[row].mean() - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
  # Kept values are x / P(keep) exactly: the expectation of every value is x.
  np.testing.assert_allclose(out[~dropped], 2.0 / (1 - p_drop), rtol=1e-7)
  # Rows (examples) and sites draw different masks; the same key and site draw the same one.
  assert (dropped[0] != dropped[1]).mean() > 0.1
  other_site = np.asarray(jax.jit(lambda x, k: t5.dropout(x, rate, k, site=2))(x, keys)) == 0
  assert (dropped != other_site).mean() > 0.1
  # A row's mask does not depend on the rest of the batch (what gradient caching relies on).
  alone = np.asarray(jax.jit(lambda x, k: t5.dropout(x, rate, k, site=1))(x[2:3], keys[2:3]))
  np.testing.assert_array_equal(alone[0], out[2])


def test_position_bias_gradient_is_the_batch_sum():
  """t5.broadcast_over_batch: values of jnp.broadcast_to, gradient = the float64 batch sum."""
  rng = np.random.default_rng(5)
  bias = jnp.asarray(rng.normal(size=(1, 3, 5, 6)), jnp.float32)
  cotangent = rng.normal(size=(9, 3, 5, 6)).astype(np.float32)
  value, vjp = jax.vjp(jax.jit(lambda b: t5.broadcast_over_batch(b, 9)), bias)
  np.testing.assert_array_equal(value, np.broadcast_to(bias, (9, 3, 5, 6)))
  (grad,) = vjp(jnp.asarray(cotangent))
  assert grad.shape == bias.shape and grad.dtype == jnp.float32
  np.testing.assert_allclose(grad, cotangent.astype(np.float64).sum(0, keepdims=True),
                             rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl, shape", [("threefry2x32", (64, 1024)), ("threefry2x32", (5, 7)),
                                         ("rbg", (3, 11))])
def test_dropout_mask_is_the_documented_draw_of_the_keys_bits(impl, shape):
  """Value i of an example's mask, from `jax.random.bits(key, (2q,), uint32)` (q = ceil(n / 4))
  as two rows of q words: blocks of q values from row 0's high 16 bits, row 1's high, row 0's low,
  row 1's low; dropped when below round(rate * 2**16)."""
  rate, rows, site = 0.3, 3, 2
  x = jnp.ones((rows, *shape), jnp.float32)
  keys = t5.fold_in_rows(jax.random.key(11, impl=impl), jnp.arange(rows))
  dropped = np.asarray(jax.jit(lambda x, k: t5.dropout(x, rate, k, site=site))(x, keys)) == 0
  n = int(np.prod(shape))
  q = -(-n // 4)
  threshold = round(rate * 2**16)
  # Drawn for the batch's keys at once (rbg's bits for a batch of keys differ from one key's).
  site_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, site)
  with jax.threefry_partitionable(False):
    all_words = np.asarray(jax.vmap(lambda k: jax.random.bits(k, (2 * q,), jnp.uint32))(
        site_keys))
  for row in range(rows):
    words = all_words[row].reshape(2, q)
    values = np.concatenate([words[0] >> 16, words[1] >> 16, words[0] & 0xFFFF,
                             words[1] & 0xFFFF])[:n]
    np.testing.assert_array_equal(dropped[row].reshape(-1), values < threshold)


def test_dense_as_a_2d_product_equals_the_formula_in_values_and_gradients():
  """t5._matmul (on CPU one [b * l, d] x [d, f] product) == float64 numpy, values and both
  gradients."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, 6)).astype(np.float32)
  cotangent = rng.normal(size=(3, 5, 6)).astype(np.float32)
  value, vjp = jax.vjp(jax.jit(t5._matmul), jnp.asarray(x), jnp.asarray(kernel))  # pylint: disable=protected-access
  x64, kernel64, cotangent64 = (a.astype(np.float64) for a in (x, kernel, cotangent))
  np.testing.assert_allclose(value, x64 @ kernel64, rtol=1e-5, atol=1e-5)
  grad_x, grad_kernel = vjp(jnp.asarray(cotangent))
  np.testing.assert_allclose(grad_x, cotangent64 @ kernel64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_kernel, np.einsum("bld,blf->df", x64, cotangent64), rtol=1e-5,
                             atol=1e-5)
