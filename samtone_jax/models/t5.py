"""The T5 encoder stack in Flax Linen (original T5 and T5 1.1), with logical axis names.

Numerically this is Hugging Face's `T5EncoderModel` / Mesh TensorFlow's encoder:
  * RMS layer norm (no mean subtraction, no bias, scale only), computed in float32;
  * self-attention without biases and without 1/sqrt(d_kv) scaling (T5 folds it into the init);
  * one relative position bias table (bidirectional buckets), computed once and added in every
    layer (in HF it lives in block 0; here it is the encoder-level `relpos_bias`, as in T5X);
  * feed-forward "relu" (wi, wo; original T5) or "gated-gelu" (wi_0, wi_1, wo; T5 1.1 / GTR) with
    gelu_new, the tanh approximation;
  * dropout on the embeddings, attention weights, inside the MLP, on each residual branch and
    after the final norm. Each example's masks are drawn from its own key (`dropout_keys`, [b]
    typed keys or raw [b, 2] uint32), so with threefry keys a mask is a function of the example,
    not of the batch it is encoded in: the gradient-cached train step, which encodes a batch in
    chunks, draws the masks of the plain one. (With "rbg" keys JAX's vmap draws every row from
    the first row's key, so masks follow the row in the batch; see train_step.DEFAULT_PRNG_IMPL.)

Parameter tree of `T5Encoder` (T5X names; shapes for d = d_model, h = num_heads, k = d_kv,
f = d_ff, V = vocab_size, NB = relative_attention_num_buckets), logical axes in brackets:
  token_embedder/embedding            [V, d]          ('vocab', 'embed')   (absent if passed in)
  relpos_bias/rel_embedding           [h, NB]         ('heads', 'relpos_buckets')
  layers_{i}/pre_attention_layer_norm/scale  [d]      ('embed',)
  layers_{i}/attention/{query,key,value}/kernel [d, h*k] ('embed', 'heads')
  layers_{i}/attention/out/kernel     [h*k, d]        ('heads', 'embed')
  layers_{i}/pre_mlp_layer_norm/scale [d]             ('embed',)
  layers_{i}/mlp/{wi | wi_0, wi_1}/kernel [d, f]      ('embed', 'mlp')
  layers_{i}/mlp/wo/kernel            [f, d]          ('mlp', 'embed')
  encoder_norm/scale                  [d]             ('embed',)
With `config.scan_layers` the per-layer entries are one `layers/...` subtree whose leaves have a
leading [num_layers] axis (logical name 'layers', never sharded); `stack_layers` and
`unstack_layers` convert between the two layouts anywhere in a params tree.
The joined `h*k` axis carries the logical name 'heads' (sharded over `model`), so kernels have the
same shapes as T5X's and as HF's (transposed) and a model-axis size that divides num_heads splits
whole heads.
"""

from collections.abc import Callable, Mapping
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

from samtone_jax.models.config import T5Config
from samtone_jax.tasks.features import PAD_ID  # positions holding it are masked out of attention

Array = jax.Array
Initializer = nn.initializers.Initializer


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """T5's relative-position buckets (Mesh TensorFlow / HF formula).

  Bidirectional (the encoder): half of the buckets are for keys after the query
  (relative_position > 0). Within each half, distances below `num_buckets // 4` get their own
  bucket; larger distances share logarithmically wider buckets up to `max_distance`, beyond which
  all fall in the last bucket. Unidirectional (the decoder's causal self-attention): all buckets
  are for keys at or before the query (later keys, masked anyway, share bucket 0); distances
  below `num_buckets // 2` get their own bucket.

  Lengths are static, so this is numpy evaluated at trace time; the logarithm is taken in float32
  like the reference implementations, so that boundary cases round the same way.

  Args:
    relative_position: int [q, k] memory_position - query_position.
    num_buckets: total number of buckets (both directions).
    max_distance: distances at or beyond this share the last bucket.
    bidirectional: False for the decoder's unidirectional buckets.

  Returns:
    int32 [q, k] bucket ids in [0, num_buckets).
  """
  relative_position = np.asarray(relative_position, dtype=np.int64)
  if bidirectional:
    half = num_buckets // 2  # Buckets per direction.
    buckets = (relative_position > 0).astype(np.int64) * half
    distance = np.abs(relative_position)
  else:
    half = num_buckets  # One direction: every bucket looks back.
    buckets = np.zeros_like(relative_position)
    distance = np.maximum(-relative_position, 0)
  max_exact = half // 2
  is_small = distance < max_exact
  with np.errstate(divide="ignore"):  # log(0) for distance 0 is discarded by is_small.
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
  scaled = np.where(is_small, 0, scaled)  # Avoid casting -inf to int.
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  buckets += np.where(is_small, distance, large)
  return buckets.astype(np.int32)


# Dropout draws 16 random bits per value: a value is dropped when its bits are below
# round(rate * 2**16), so the rate is exact to 2**-17 (0.1 -> 0.1000061), and kept values are
# scaled by the exact 1 / P(keep), so the expectation is unchanged. 16 bits instead of the 32 of
# `jax.random.bernoulli`, drawn in threefry's original (non-partitionable) mode, which hashes two
# 32-bit words per call where the partitionable mode spends a call on each value: masks cost about
# a quarter of the hashing (tiny T5, batch 256: the CPU train step 1.22 -> 0.93 s,
# benchmarks/README.md). Partitioning does not need the other mode here: every example has its
# own key, and its mask is one row's draw.
# An example's mask is drawn as `jax.random.bits(key, (2 * q,), uint32)` (q = ceil(values / 4)),
# taken as two rows of q words; each word gives two values, and the mask is four contiguous blocks
# of q values: the high 16 bits of row 0, of row 1, then the low 16 bits of row 0, of row 1. With
# threefry keys the two rows are the two outputs of the hash, used where they are computed
# (`_word_rows`). Both choices are about XLA:CPU's memory traffic: `jax.random.bits` with uint16
# interleaves the halves of each word (a [.., 2, n/2] -> [.., n/2, 2] transpose that XLA fused
# into every consumer of the mask, forward and backward), and concatenating the hash's outputs,
# then the halves, materialised three copies of the bits (tiny T5, batch 256: ~15% of the step).
_DROPOUT_BITS = 16


def dropout(x: Array, rate: float, keys: Array | None, site: int) -> Array:
  """Inverted dropout with one key per example: kept values / P(keep), as `nn.Dropout`.

  Args:
    x: [b, ...] activations.
    rate: probability of dropping a value (applied as round(rate * 2**16) / 2**16).
    keys: [b] per-example keys (typed, of any implementation, or raw [b, 2] uint32), or None:
      no dropout (deterministic).
    site: which dropout site of the module this is; folded into the keys so that the sites
      sharing an example's key draw independent masks.

  Returns:
    x's shape and dtype.
  """
  if keys is None or rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  scale = 1 << _DROPOUT_BITS
  threshold = min(round(rate * scale), scale - 1)
  if threshold == 0:  # rounds to no dropout
    return x
  site_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, site)
  size = math.prod(x.shape[1:])
  quarter = -(-size // 4)
  row_0, row_1 = jax.vmap(lambda key: _word_rows(key, quarter))(site_keys)  # [b, q] each
  # Block j of the mask: row j % 2, high 16 bits for j < 2, low 16 bits after (see above).
  block = np.arange(4)[None, :, None]
  words = jnp.where(block % 2 == 0, row_0[:, None, :], row_1[:, None, :])  # [b, 4, q]
  values = jnp.where(block < 2, words >> 16, words & jnp.uint32(0xFFFF))
  keep = (values >= jnp.uint32(threshold)).reshape(x.shape[0], 4 * quarter)
  keep = keep[:, :size].reshape(x.shape)
  kept_scale = jnp.asarray(scale / (scale - threshold), x.dtype)
  return jax.lax.select(keep, x * kept_scale, jnp.zeros_like(x))


def _word_rows(key: Array, count: int) -> tuple[Array, Array]:
  """One key's `jax.random.bits(key, (2 * count,), uint32)` (threefry's original mode) as 2 rows.

  Args:
    key: a [] typed key of any implementation, or a raw [2] uint32 key (the configured default
      implementation's).
    count: words per row.

  Returns:
    (bits[:count], bits[count:]), uint32 [count] each. For threefry keys these are the hash's
    two outputs for the counter pairs (i, count + i), which is how threefry's original mode
    draws the 2 * count words; calling the hash directly keeps XLA from concatenating them.
  """
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
  if impl != "threefry2x32":
    bits = jax.random.bits(key, (2 * count,), jnp.uint32)
    return bits[:count], bits[count:]
  key_words = jax.random.key_data(key) if typed else key
  counter = jax.lax.iota(jnp.uint32, count)
  return tuple(jax.extend.random.threefry2x32_p.bind(key_words[0], key_words[1], counter,
                                                     counter + jnp.uint32(count)))


def fold_in_rows(key: Array, rows: Array) -> Array:
  """[] key (or raw [2]), int [b] -> [b] keys (raw: [b, 2]): `fold_in(key, rows[i])` for every i."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, rows)


def _fold_in_each(keys: Array | None, data: int) -> Array | None:
  """[b] keys (raw: [b, 2]) -> the same shape: `fold_in(keys[i], data)`; None stays None."""
  return None if keys is None else jax.vmap(jax.random.fold_in, (0, None))(keys, data)


# Dropout sites of the encoder outside its layers, and the offset of layer i's keys; the sites of
# a layer are numbered inside it (attention weights 0, MLP hidden 1, residual branches 2 and 3).
_EMBEDDING_SITE, _FINAL_SITE, _FIRST_LAYER = 0, 1, 2


def _param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...],
           names: tuple[str, ...]) -> Array:
  """A float32 parameter carrying logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; T5X's init (standard normal).

  Attributes:
    one_hot: look up by a one-hot [b, l, V] @ [V, d] matmul (`T5Config.one_hot_embedding`)
      instead of a gather; the same values, and a matmul gradient instead of a scatter-add.
  """

  vocab_size: int
  features: int
  dtype: Any = jnp.float32
  one_hot: bool = False

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    """tokens: int [b, l] -> [b, l, embed] in `dtype`."""
    embedding = _param(self, "embedding", nn.initializers.normal(stddev=1.0),
                       (self.vocab_size, self.features), ("vocab", "embed"))
    if self.one_hot:
      one_hot = jax.nn.one_hot(tokens, self.vocab_size, dtype=self.dtype)
      one_hot = nn.with_logical_constraint(one_hot, ("batch", "length", "vocab"))
      # HIGHEST: each output is one table entry times 1, exact in float32 (the default
      # precision may round the table to bfloat16 on TPU).
      return jnp.dot(one_hot, embedding.astype(self.dtype),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.take(embedding, tokens, axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, in float32; no mean, no bias."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free linear map with a float32 kernel [in, features] with logical axis names."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                    self.kernel_axes)
    return _matmul(x.astype(self.dtype), kernel.astype(self.dtype))


def _matmul(x: Array, kernel: Array) -> Array:
  """[..., d] @ [d, f] -> [..., f]; on CPU as one 2-D product over the flattened leading axes.

  As a [b, l, d] x [d, f] product, the kernel's gradient contracts two axes, and XLA:CPU wrote the
  output's cotangent transposed inside the elementwise fusion that computed it (e.g. the gated-GELU
  backward), a strided write per value: 37% of the small T5 CPU train step. As [b * l, d] x [d, f],
  forward and gradients are plain 2-D products (small, batch 32: 5.7 -> 3.5 s per step; tiny, batch
  256: 1.16 -> 0.76 s; the same losses to the bit). Other platforms keep the N-d product, whose
  reshape could cost a relayout where the leading axes are tiled (TPU).
  """
  def flat(x, kernel):
    return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])

  return jax.lax.platform_dependent(x, kernel, cpu=flat, default=jnp.dot)


class RelativePositionBias(nn.Module):
  """The shared relative position bias, one scalar per (head, bucket); bidirectional in the
  encoder, unidirectional in the decoder."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool = True

  @nn.compact
  def __call__(self, length: int) -> Array:
    """Returns float32 [1, heads, length, length] (query position, key position)."""
    rel_embedding = _param(
        self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    positions = np.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                       self.num_buckets, self.max_distance, self.bidirectional)
    # [h, NB] gathered at [q, k] -> [h, q, k].
    values = jnp.take(rel_embedding, jnp.asarray(buckets), axis=1)
    return values[None]


def _sum_over_batch(cotangent: Array) -> Array:
  """[b, ...] -> [1, ...] float32 sum over the batch; on CPU as a vector-matrix product.

  XLA:CPU reduces over a leading dimension slowly: the relative position bias's gradient, the
  [b, h, l, l] logits' cotangent summed over b, took 212 ms of a 1.1 s tiny train step (batch
  256, length 128) as a reduce and 10 ms as ones[b] @ [b, h*l*l]. Other platforms keep the reduce.
  """
  batch = cotangent.shape[0]
  flat = cotangent.reshape(batch, -1)

  def by_product(flat):
    return jnp.dot(jnp.ones((batch,), flat.dtype), flat, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)

  def by_reduce(flat):
    return jnp.sum(flat, axis=0, dtype=jnp.float32)

  total = jax.lax.platform_dependent(flat, cpu=by_product, default=by_reduce)
  return total.reshape(1, *cotangent.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_over_batch(bias: Array, batch: int) -> Array:
  """[1, ...] -> [batch, ...] (`jnp.broadcast_to`); the gradient is `_sum_over_batch`."""
  return jnp.broadcast_to(bias, (batch, *bias.shape[1:]))


def _broadcast_over_batch_fwd(bias, batch):
  return broadcast_over_batch(bias, batch), jnp.zeros((), bias.dtype)


def _broadcast_over_batch_bwd(batch, dtype_carrier, cotangent):
  del batch
  return (_sum_over_batch(cotangent).astype(dtype_carrier.dtype),)


broadcast_over_batch.defvjp(_broadcast_over_batch_fwd, _broadcast_over_batch_bwd)


class SelfAttention(nn.Module):
  """T5 multi-head attention: no biases, no logit scaling, float32 softmax.

  Self-attention by default; with `inputs_kv` the keys and values come from another sequence
  (the decoder's attention over the encoder's outputs, without a position bias).

  With `decode` (the decoder's incremental decoding, as t5x/flaxformer's `decode=True`) the
  module keeps a flax `cache` collection:
    * self-attention: `cached_key`, `cached_value` [b, L, h, k] (this module's own layout: batch,
      length, heads, d_kv) and `cache_index` int32 []. The first call, with the full-length
      [b, L, d] inputs, only creates the zero cache (its output is that of the plain module and
      is meant to be discarded; under jit it is dead code). Each later call takes one position
      x [b, 1, d], writes its key and value at `cache_index`, attends over the L cached ones
      with row `cache_index` of the [., ., L, L] biases, and advances the index.
    * attention over `inputs_kv`: the first call stores the projected keys and values of
      `inputs_kv`, [b, s, h, k], as `cached_key` / `cached_value`; later calls read them and
      ignore `inputs_kv`, so the encoder's outputs are projected once per decode, not per step.
  The parameters are the same in both modes.
  """

  config: T5Config
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, position_bias: Array | None, mask_bias: Array,
               dropout_keys: Array | None, inputs_kv: Array | None = None) -> Array:
    """Attends from `x` over `x` (or over `inputs_kv`).

    Args:
      x: [b, l, d] normalised inputs (the queries; also the keys and values without inputs_kv).
      position_bias: float32 [1, h, l, s] relative position bias, or None (cross-attention).
      mask_bias: float32 [b, 1, 1, s] (or anything broadcastable to [b, 1, l, s], e.g. a causal
        [1, 1, l, l]): 0 for keys to attend to, a large negative for padding (or future) keys.
        Kept apart from `position_bias`; XLA fuses their sum into the logits.
      dropout_keys: [b] per-example keys of this layer, or None: no dropout.
      inputs_kv: [b, s, d] the sequence to attend over, or None: `x` (s = l).

    Returns:
      [b, l, d].
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    inner = cfg.num_heads * cfg.d_kv
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    # T5 does not divide logits by sqrt(d_kv); it folds that factor into the query init.
    query_init = lambda *args: init(*args) / math.sqrt(cfg.d_kv)
    b, l, _ = x.shape
    kv = x if inputs_kv is None else inputs_kv

    def project(name, kernel_init, inputs=x):
      y = Dense(inner, ("embed", "heads"), kernel_init, dtype, name=name)(inputs)
      y = y.reshape(b, inputs.shape[1], cfg.num_heads, cfg.d_kv)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    query = project("query", query_init)
    if position_bias is None:
      bias = mask_bias
    elif self.decode:
      bias = position_bias + mask_bias
    else:
      # The same [1, h, l, s] bias for every example; its gradient is a sum over the batch.
      bias = broadcast_over_batch(position_bias, b) + mask_bias
    if self.decode:
      key, value, bias = self._decode_keys_values(project, init, x, inputs_kv, bias)
    else:
      key = project("key", init, kv)
      value = project("value", init, kv)
    if dropout_keys is None or cfg.attention_dropout == 0.0:
      # No mask on the weights: JAX's fused attention (XLA's fusion here; cuDNN's flash kernel
      # where JAX selects it), with T5's unscaled logits and both biases; it also computes the
      # logits and the softmax in float32 and casts the weights to `dtype`, as below.
      out = jax.nn.dot_product_attention(query, key, value, bias=bias, scale=1.0)
    else:
      logits = jnp.einsum("bqhk,bshk->bhqs", query, key, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits + bias, axis=-1)
      weights = dropout(weights, cfg.attention_dropout, dropout_keys, site=0)
      out = jnp.einsum("bhqs,bshk->bqhk", weights.astype(dtype), value)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(b, l, inner)
    return Dense(cfg.d_model, ("heads", "embed"), init, dtype, name="out")(out)

  def _decode_keys_values(self, project: Callable[..., Array], init: Initializer, x: Array,
                          inputs_kv: Array | None, bias: Array) -> tuple[Array, Array, Array]:
    """Keys, values and bias from (and into) the `cache` collection; see the class docstring.

    Args:
      project: `project(name, kernel_init, inputs)` -> [b, n, h, k] of `__call__`.
      init: the key/value kernel initializer.
      x: [b, l, d] the queries' inputs (l = L on the first call, then 1).
      inputs_kv: [b, s, d] or None (self-attention).
      bias: position + mask bias, broadcastable to [b, h, l, L] (or [b, h, l, s]).

    Returns:
      (key, value [b, L or s, h, k], bias broadcastable to [b, h, l, L or s]).
    """
    cfg = self.config
    axes = ("batch", "length", "heads", "kv")
    initialized = self.has_variable("cache", "cached_key")
    if inputs_kv is not None:
      if initialized:
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key = project("key", init, inputs_kv)
        value = project("value", init, inputs_kv)
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
      return (nn.with_logical_constraint(key, axes), nn.with_logical_constraint(value, axes),
              bias)
    key = project("key", init, x)
    value = project("value", init, x)
    if not initialized:
      # Sizes the cache from the full-length call; the step calls fill it.
      b, length = x.shape[:2]
      zeros = jnp.zeros((b, length, cfg.num_heads, cfg.d_kv), key.dtype)
      self.put_variable("cache", "cached_key", zeros)
      self.put_variable("cache", "cached_value", zeros)
      self.put_variable("cache", "cache_index", jnp.zeros((), jnp.int32))
      return key, value, bias
    if x.shape[1] != 1:
      raise ValueError(f"decoding with a cache takes one position per call, got inputs of "
                       f"length {x.shape[1]}")
    index = self.get_variable("cache", "cache_index")
    cached_key = jax.lax.dynamic_update_slice_in_dim(
        self.get_variable("cache", "cached_key"), key, index, axis=1)
    cached_value = jax.lax.dynamic_update_slice_in_dim(
        self.get_variable("cache", "cached_value"), value, index, axis=1)
    cached_key = nn.with_logical_constraint(cached_key, axes)
    cached_value = nn.with_logical_constraint(cached_value, axes)
    self.put_variable("cache", "cached_key", cached_key)
    self.put_variable("cache", "cached_value", cached_value)
    self.put_variable("cache", "cache_index", index + 1)
    # Row `index` of the full-length biases: the current query against every cached key (the
    # causal mask hides the zero keys after it).
    bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)
    return cached_key, cached_value, bias


class MLP(nn.Module):
  """T5 feed-forward block: relu (wi, wo) or gated-gelu (wi_0, wi_1, wo)."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, dropout_keys: Array | None) -> Array:
    """x: [b, l, d], dropout_keys: [b] keys or None (no dropout) -> [b, l, d]."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    if cfg.feed_forward_proj == "relu":
      hidden = jax.nn.relu(Dense(cfg.d_ff, ("embed", "mlp"), init, dtype, name="wi")(x))
    elif cfg.feed_forward_proj == "gated-gelu":
      gate = Dense(cfg.d_ff, ("embed", "mlp"), init, dtype, name="wi_0")(x)
      linear = Dense(cfg.d_ff, ("embed", "mlp"), init, dtype, name="wi_1")(x)
      # HF's "gelu_new" = the tanh approximation.
      hidden = jax.nn.gelu(gate, approximate=True) * linear
    else:
      raise ValueError(f"T5Config.feed_forward_proj={cfg.feed_forward_proj!r}; expected "
                       "'relu' or 'gated-gelu'.")
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = dropout(hidden, cfg.dropout_rate, dropout_keys, site=1)
    return Dense(cfg.d_model, ("mlp", "embed"), init, dtype, name="wo")(hidden)


class EncoderLayer(nn.Module):
  """Pre-norm transformer layer: x + attn(norm(x)); x + mlp(norm(x)).

  With `scanned`, returns (x, None), the (carry, output) pair that `nn.scan` expects.
  """

  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, position_bias: Array, mask_bias: Array,
               dropout_keys: Array | None) -> Array | tuple[Array, None]:
    """x: [b, l, d]; biases and this layer's [b] keys as for `SelfAttention` -> [b, l, d]."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    y = SelfAttention(cfg, name="attention")(y, position_bias, mask_bias, dropout_keys)
    x = x + dropout(y, cfg.dropout_rate, dropout_keys, site=2)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
    y = MLP(cfg, name="mlp")(y, dropout_keys)
    x = x + dropout(y, cfg.dropout_rate, dropout_keys, site=3)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class T5Encoder(nn.Module):
  """The T5 encoder stack.

  Attributes:
    config: the architecture.
    token_embedder: an `Embed` module to use (shared with another tower, bound elsewhere); when
      None the encoder owns one under `token_embedder`.
    stop_embedding_gradient: treat the embeddings as constants (a frozen embedder).
  """

  config: T5Config
  token_embedder: nn.Module | None = None
  stop_embedding_gradient: bool = False

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool = True,
               dropout_keys: Array | None = None) -> Array:
    """Encodes token ids.

    Args:
      tokens: int32 [b, l]; 0 is padding (masked out as attention keys).
      deterministic: disables dropout.
      dropout_keys: [b] keys (raw: [b, 2] uint32), each example's dropout key, used when not deterministic.
        None: `fold_in(make_rng('dropout'), i)` for row i (needs a 'dropout' rng).

    Returns:
      [b, l, d_model] hidden states in `config.dtype` (padded positions hold values that must be
      ignored).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if deterministic:
      dropout_keys = None
    elif dropout_keys is None:
      dropout_keys = fold_in_rows(self.make_rng("dropout"), jnp.arange(tokens.shape[0]))
    embedder = self.token_embedder
    if embedder is None:
      embedder = Embed(cfg.vocab_size, cfg.d_model, dtype, cfg.one_hot_embedding,
                       name="token_embedder")
    tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
    x = embedder(tokens).astype(dtype)
    if self.stop_embedding_gradient:
      x = jax.lax.stop_gradient(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = dropout(x, cfg.dropout_rate, _fold_in_each(dropout_keys, _EMBEDDING_SITE), site=0)

    length = tokens.shape[1]
    position_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance, cfg.num_heads,
                                         name="relpos_bias")(length)
    # Padding keys get the most negative float32: exp underflows to exactly 0, as in HF.
    key_mask = (tokens != PAD_ID)[:, None, None, :]
    mask_bias = jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min)

    layer_cls = EncoderLayer
    if cfg.remat:
      # Recompute each layer's activations in the backward pass.
      policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
      if cfg.remat_policy not in policies:
        raise ValueError(f"T5Config.remat_policy={cfg.remat_policy!r}; expected one of "
                         f"{sorted(policies)}")
      # Inside a scan the loop already keeps XLA from merging the recomputation into the
      # forward pass, so common-subexpression protection is not needed there (flax's advice).
      layer_cls = nn.remat(EncoderLayer, policy=policies[cfg.remat_policy],
                           prevent_cse=not cfg.scan_layers)
    # Layer i's keys: the example's key folded with _FIRST_LAYER + i, in both layer layouts, so
    # scanned and unrolled layers draw the same masks.
    layer_keys = [_fold_in_each(dropout_keys, _FIRST_LAYER + i) for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      # One layer body scanned num_layers times: params stacked on a leading 'layers' axis, the
      # biases broadcast to every layer, the layer's keys ([num_layers, b, 2]) scanned over.
      stacked_keys = None if dropout_keys is None else jnp.stack(layer_keys)
      scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, 0),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, scanned=True, name="layers")(x, position_bias, mask_bias,
                                                      stacked_keys)
    else:
      for i in range(cfg.num_layers):
        x = layer_cls(cfg, name=f"layers_{i}")(x, position_bias, mask_bias, layer_keys[i])

    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="encoder_norm")(x)
    x = dropout(x, cfg.dropout_rate, _fold_in_each(dropout_keys, _FINAL_SITE), site=0)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def layer_index(key: str) -> int | None:
  """i for a `layers_{i}` key of the unrolled layout, else None."""
  prefix, _, index = key.partition("_")
  return int(index) if prefix == "layers" and index.isdigit() else None


def stack_layers(tree: Any, stack_leaves: Callable[..., Any] | None = None) -> Any:
  """Converts every `layers_0 ... layers_{n-1}` group in a params tree into one `layers` subtree
  with each leaf stacked on a new leading axis (the `scan_layers` layout). Other entries, and
  trees already stacked, are returned unchanged.

  Args:
    tree: a params tree of numpy or jax arrays, or of abstract leaves.
    stack_leaves: `stack_leaves(*leaves) -> leaf`, one leaf of every layer in layer order to the
      stacked leaf; default `np.stack` (all leaves numpy) or `jnp.stack`. The checkpoint layer
      passes one for abstract `jax.ShapeDtypeStruct` leaves.
  """
  if not isinstance(tree, Mapping):
    return tree
  indices = sorted(i for i in map(layer_index, tree) if i is not None)
  out = {k: stack_layers(v, stack_leaves) for k, v in tree.items() if layer_index(k) is None}
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"layer entries {[f'layers_{i}' for i in indices]} are not "
                       "layers_0 ... layers_{n-1}")
    if "layers" in tree:
      raise ValueError("a params tree has both `layers` and `layers_0 ...` entries")
    layers = [tree[f"layers_{i}"] for i in indices]
    if stack_leaves is None:
      stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(layers)) \
          else jnp.stack
      stack_leaves = lambda *xs: stack(xs)  # pylint: disable=unnecessary-lambda-assignment
    out["layers"] = jax.tree.map(stack_leaves, *layers)
  return out


def unstack_layers(tree: Any, take_layer: Callable[[Any, int], Any] | None = None) -> Any:
  """The inverse of `stack_layers`: every `layers` subtree (leaves [num_layers, ...]) becomes
  `layers_0 ... layers_{n-1}`.

  Args:
    tree: a params tree, stacked where it has `layers` entries.
    take_layer: `take_layer(leaf, i) -> leaf` of layer i; default `leaf[i]`. The checkpoint layer
      passes one for abstract `jax.ShapeDtypeStruct` leaves.
  """
  if not isinstance(tree, Mapping):
    return tree
  take_layer = take_layer or (lambda x, i: x[i])
  out = {k: unstack_layers(v, take_layer) for k, v in tree.items() if k != "layers"}
  if "layers" in tree:
    lengths = {x.shape[0] for x in jax.tree.leaves(tree["layers"])}
    if len(lengths) != 1:
      raise ValueError(f"stacked layer leaves disagree on the number of layers: {lengths}")
    for i in range(lengths.pop()):
      out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: take_layer(x, i), tree["layers"])
  return out


def stacked_mask(tree: Any) -> Any:
  """A tree like `tree` of bools: True for leaves inside a `layers` subtree (stacked layers of
  the `scan_layers` layout, leading axis = layer)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "layers" for k in path), tree)
