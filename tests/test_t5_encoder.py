"""T5 encoder pieces against independent references.

Hidden states against HF's T5EncoderModel are in test_hf_import.py (they need the importer);
here: HF's relative-position bucket function, the RMS-norm formula in numpy, logical axis names,
remat and padding invariance.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5 import modeling_t5

from samtone_jax.models.config import T5Config
from samtone_jax.models.t5 import RMSNorm, T5Encoder, relative_position_bucket

CONFIG = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=16, relative_attention_max_distance=12,
                  dropout_rate=0.0)


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 12), (8, 16), (32, 20),
                                                      (64, 256)])
def test_relative_position_bucket_matches_hf(num_buckets, max_distance):
  positions = np.arange(-400, 401)
  ours = relative_position_bucket(positions, num_buckets, max_distance)
  expected = modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      torch.as_tensor(positions), bidirectional=True, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, expected)
  # Every bucket is reached over this range but `num_buckets // 2` (distance 0 counts as "not
  # after", so the "after" half starts at distance 1): a quirk of T5 that checkpoints rely on.
  np.testing.assert_array_equal(np.unique(ours), np.delete(np.arange(num_buckets),
                                                            num_buckets // 2))


def test_rms_norm_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 3
  scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
  ours = RMSNorm(1e-6).apply({"params": {"scale": scale}}, jnp.asarray(x))
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
  # bfloat16 activations are normalised in float32 and only then rounded.
  ours_bf16 = RMSNorm(1e-6, jnp.bfloat16).apply({"params": {"scale": scale}},
                                               jnp.asarray(x, jnp.bfloat16))
  assert ours_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours_bf16, np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_parameters_carry_logical_axes(feed_forward_proj):
  config = dataclasses.replace(CONFIG, feed_forward_proj=feed_forward_proj)
  tokens = jnp.ones((2, 5), jnp.int32)
  abstract = jax.eval_shape(T5Encoder(config).init, jax.random.PRNGKey(0), tokens)["params"]
  specs = nn.get_partition_spec(abstract)
  flat = {"/".join(p.key for p in path): (tuple(spec), leaf.shape, leaf.dtype)
          for (path, spec), leaf in zip(
              jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(
                  x, jax.sharding.PartitionSpec))[0],
              jax.tree.leaves(nn.meta.unbox(abstract)))}
  inner = config.num_heads * config.d_kv
  expected = {
      "token_embedder/embedding": (("vocab", "embed"), (40, 16)),
      "relpos_bias/rel_embedding": (("heads", "relpos_buckets"), (2, 16)),
      "encoder_norm/scale": (("embed",), (16,)),
  }
  mlp_in = ["wi"] if feed_forward_proj == "relu" else ["wi_0", "wi_1"]
  for i in range(config.num_layers):
    layer = f"layers_{i}"
    expected[f"{layer}/pre_attention_layer_norm/scale"] = (("embed",), (16,))
    expected[f"{layer}/pre_mlp_layer_norm/scale"] = (("embed",), (16,))
    for name in ("query", "key", "value"):
      expected[f"{layer}/attention/{name}/kernel"] = (("embed", "heads"), (16, inner))
    expected[f"{layer}/attention/out/kernel"] = (("heads", "embed"), (inner, 16))
    for name in mlp_in:
      expected[f"{layer}/mlp/{name}/kernel"] = (("embed", "mlp"), (16, 24))
    expected[f"{layer}/mlp/wo/kernel"] = (("mlp", "embed"), (24, 16))
  # Exactly these parameters: one position-bias table for the whole stack, no biases.
  assert {k: v[:2] for k, v in flat.items()} == expected
  assert all(v[2] == jnp.float32 for v in flat.values())


def _tokens():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 40, size=(2, 9)).astype(np.int32)
  tokens[1, 6:] = 0
  return jnp.asarray(tokens)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_values_and_gradients(policy):
  tokens = _tokens()
  with_dropout = dataclasses.replace(CONFIG, dropout_rate=0.2)
  params = T5Encoder(with_dropout).init(jax.random.PRNGKey(0), tokens)["params"]

  def loss(p, config):
    hidden = T5Encoder(config).apply({"params": p}, tokens, deterministic=False,
                                     rngs={"dropout": jax.random.PRNGKey(2)})
    return jnp.sum(jnp.sin(hidden))

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain = grad_fn(params, with_dropout)
  remat = grad_fn(params, dataclasses.replace(with_dropout, remat=True, remat_policy=policy))
  # Same dropout masks (rngs follow module paths) and same arithmetic.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, remat)


def test_trailing_padding_does_not_change_real_tokens():
  tokens = _tokens()
  module = T5Encoder(CONFIG)
  params = module.init(jax.random.PRNGKey(1), tokens)["params"]
  padded = jnp.pad(tokens, ((0, 0), (0, 7)))
  short = module.apply({"params": params}, tokens)
  long = module.apply({"params": params}, padded)
  mask = np.asarray(tokens != 0)
  np.testing.assert_allclose(np.asarray(long[:, :9])[mask], np.asarray(short)[mask], rtol=1e-5,
                             atol=1e-6)
  # An all-padding row stays finite (evaluation batches are padded with empty rows).
  empty = module.apply({"params": params}, jnp.zeros((1, 5), jnp.int32))
  assert np.all(np.isfinite(empty))
