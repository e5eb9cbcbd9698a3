"""The T5 encoder-decoder (original T5 and T5 1.1) in Flax Linen, reusing `t5.T5Encoder`.

Numerically this is Hugging Face's `T5ForConditionalGeneration` / Mesh TensorFlow's T5:
  * the encoder is `t5.T5Encoder`, sharing the token embedding with the decoder;
  * each decoder layer is pre-norm causal self-attention, attention over the encoder's outputs
    (cross-attention, no position bias, padding keys of the encoder masked) and the feed-forward
    block of the encoder ("relu" or "gated-gelu");
  * the decoder has its own relative position bias with unidirectional buckets, computed once and
    added in every layer's self-attention;
  * the head is either a separate `logits_dense` kernel (T5 1.1, `tie_word_embeddings=False`) or
    the token embedding's transpose applied to the decoder output scaled by d_model**-0.5
    (original T5); logits are float32.

The decoder's self-attention mask is causal only, as in HF: trailing target padding can only be
attended to by later (padding) positions, so it never changes the logits of real positions, and
the loss ignores the padded ones. Decoder inputs are the targets shifted right with 0 (the pad id,
T5's decoder start token) first; `shift_right` makes them.

Incremental decoding (`decode(..., decode=True, max_decode_length=L)`, mutable 'cache', as t5x's
`decode=True`): a first full-length call creates the 'cache' collection, then each call runs the
decoder on one position. Its tree, per decoder layer (with `scan_layers`, one `layers` subtree
whose leaves have a leading [num_layers] axis):
  decoder/layers_{i}/self_attention/cached_key, cached_value  [b, L, h, k]  zeros, then filled
  decoder/layers_{i}/self_attention/cache_index               int32 []     the next position
  decoder/layers_{i}/encoder_decoder_attention/cached_key, cached_value  [b, s, h, k]  of `encoded`
The leaves are plain arrays; inside the model they are constrained to the logical axes ('batch',
'length', 'heads', 'kv'), so they shard like the activations. `decoding.py` drives it.

Dropout follows the encoder's per-example scheme (`t5.dropout`): each example's key is split into
an encoder key and a decoder key, so an example's masks do not depend on its batch.

Parameter tree of `EncoderDecoder` (T5X names; d = d_model, h*k = num_heads * d_kv, f = d_ff,
V = vocab_size, NB = relative_attention_num_buckets), logical axes in brackets:
  token_embedder/embedding                          [V, d]     ('vocab', 'embed')
  encoder/...                                       the `T5Encoder` tree without token_embedder
  decoder/relpos_bias/rel_embedding                 [h, NB]    ('heads', 'relpos_buckets')
  decoder/layers_{i}/pre_self_attention_layer_norm/scale   [d] ('embed',)
  decoder/layers_{i}/self_attention/{query,key,value}/kernel [d, h*k] ('embed', 'heads')
  decoder/layers_{i}/self_attention/out/kernel      [h*k, d]   ('heads', 'embed')
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale  [d] ('embed',)
  decoder/layers_{i}/encoder_decoder_attention/...  as self_attention
  decoder/layers_{i}/pre_mlp_layer_norm/scale       [d]        ('embed',)
  decoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel   [d, f]     ('embed', 'mlp')
  decoder/layers_{i}/mlp/wo/kernel                  [f, d]     ('mlp', 'embed')
  decoder/decoder_norm/scale                        [d]        ('embed',)
  decoder/logits_dense/kernel                       [d, V]     ('embed', 'vocab')  (untied only)
With `scan_layers`, `layers_{i}` of both stacks become one stacked `layers` subtree each (leading
[num_layers] axis, logical name 'layers'); `t5.stack_layers` / `t5.unstack_layers` convert.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samtone_jax.models import t5
from samtone_jax.models.config import EncoderDecoderConfig, T5Config

Array = jax.Array

# The decoder's first input token (T5 uses the pad id) and the end-of-sequence id of T5's
# SentencePiece vocabularies.
DECODER_START_ID = t5.PAD_ID
EOS_ID = 1

# The encoder's per-example dropout-key helper and site numbers: the decoder derives its keys the
# same way.
_fold_in_each = t5._fold_in_each  # pylint: disable=protected-access
_EMBEDDING_SITE = t5._EMBEDDING_SITE  # pylint: disable=protected-access
_FINAL_SITE = t5._FINAL_SITE  # pylint: disable=protected-access
_FIRST_LAYER = t5._FIRST_LAYER  # pylint: disable=protected-access
# Split of an example's dropout key between the stacks.
_ENCODER_KEY, _DECODER_KEY = 0, 1
# Dropout sites inside a decoder layer, on that layer's key: attention weights of the two
# attentions are drawn from keys folded with these (each attention's own site 0); the MLP hidden
# uses site 1 (inside `t5.MLP`); the three residual branches 2, 3, 4.
_SELF_ATTENTION_KEY, _CROSS_ATTENTION_KEY = 5, 6


def shift_right(targets: Array) -> Array:
  """int [b, l] targets -> [b, l] decoder inputs: DECODER_START_ID, targets[:, :-1]."""
  start = jnp.full_like(targets[:, :1], DECODER_START_ID)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


def remat_layer(layer_cls: type[nn.Module], config: T5Config) -> type[nn.Module]:
  """`layer_cls`, rematerialised per `config.remat` / `remat_policy` (as the encoder's layers)."""
  if not config.remat:
    return layer_cls
  policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  if config.remat_policy not in policies:
    raise ValueError(f"T5Config.remat_policy={config.remat_policy!r}; expected one of "
                     f"{sorted(policies)}")
  return nn.remat(layer_cls, policy=policies[config.remat_policy],
                  prevent_cse=not config.scan_layers)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer: causal self-attention, cross-attention, MLP, each residual.

  With `scanned`, returns (x, None), the (carry, output) pair that `nn.scan` expects; with
  `decode`, both attentions keep a `cache` collection (`t5.SelfAttention`).
  """

  config: T5Config
  scanned: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array, position_bias: Array, self_mask_bias: Array,
               cross_mask_bias: Array, dropout_keys: Array | None) -> Array | tuple[Array, None]:
    """One layer.

    Args:
      x: [b, l, d] decoder activations (with `decode`, l is 1 after the cache-creating call).
      encoded: [b, s, d] the encoder's outputs.
      position_bias: float32 [1, h, L, L] the decoder's (unidirectional) position bias; L = l,
        or the cache length with `decode`.
      self_mask_bias: float32 [1, 1, L, L] causal mask bias (0 or a large negative).
      cross_mask_bias: float32 [b, 1, 1, s] encoder padding mask bias.
      dropout_keys: [b, 2] this layer's per-example keys, or None: no dropout.

    Returns:
      [b, l, d].
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    rate = cfg.dropout_rate
    y = t5.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
    y = t5.SelfAttention(cfg, self.decode, name="self_attention")(
        y, position_bias, self_mask_bias, _fold_in_each(dropout_keys, _SELF_ATTENTION_KEY))
    x = x + t5.dropout(y, rate, dropout_keys, site=2)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = t5.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
    y = t5.SelfAttention(cfg, self.decode, name="encoder_decoder_attention")(
        y, None, cross_mask_bias, _fold_in_each(dropout_keys, _CROSS_ATTENTION_KEY),
        inputs_kv=encoded)
    x = x + t5.dropout(y, rate, dropout_keys, site=3)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = t5.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
    y = t5.MLP(cfg, name="mlp")(y, dropout_keys)
    x = x + t5.dropout(y, rate, dropout_keys, site=4)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


def causal_mask_bias(length: int) -> Array:
  """float32 [1, 1, length, length]: 0 where key <= query, the most negative float32 after."""
  positions = np.arange(length)
  allowed = positions[None, :] <= positions[:, None]
  return jnp.asarray(np.where(allowed, 0.0, np.finfo(np.float32).min)[None, None],
                     jnp.float32)


class T5Decoder(nn.Module):
  """The T5 decoder stack and its language-model head.

  Attributes:
    config: sizes, feed-forward kind, dropout, dtype, remat / scan (shared with the encoder).
    num_layers: decoder depth.
    tie_word_embeddings: logits from `token_embedder`'s table (scaled by d_model**-0.5) instead
      of a separate `logits_dense` kernel.
    token_embedder: the `t5.Embed` shared with the encoder (owned by the parent).
  """

  config: T5Config
  num_layers: int
  tie_word_embeddings: bool
  token_embedder: nn.Module

  @nn.compact
  def __call__(self, decoder_input_tokens: Array, encoded: Array, encoder_input_tokens: Array,
               dropout_keys: Array | None = None, logits_position: Array | None = None,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Logits of the next token at every decoder position.

    Incremental decoding (`decode=True`, mutable 'cache'): a first call with the full-length
    [b, max_decode_length] tokens (any values) and the encoder's outputs creates the cache
    (each layer's zero self-attention keys/values and its cross-attention keys/values of
    `encoded`; see `t5.SelfAttention`); then each call takes the one token at the next position,
    [b, 1], and returns its logits [b, 1, vocab] as the teacher-forced decoder would at that
    position (`encoded` is no longer read; `encoder_input_tokens` still masks padding).

    Args:
      decoder_input_tokens: int32 [b, l] (targets shifted right; see `shift_right`).
      encoded: [b, s, d] the encoder's outputs.
      encoder_input_tokens: int32 [b, s] the encoder's inputs; 0 (padding) keys are masked.
      dropout_keys: [b, 2] per-example decoder keys, or None: no dropout.
      logits_position: int32 [] or None: only that position's logits.
      decode: use and update the key/value cache.
      max_decode_length: with `decode`, the cache length L (static).

    Returns:
      float32 [b, l, vocab_size], or [b, 1, vocab_size] at `logits_position`.

    Raises:
      ValueError: `decode` without max_decode_length, or with dropout.
    """
    cfg = self.config
    if decode and (max_decode_length is None or dropout_keys is not None):
      raise ValueError("T5Decoder(decode=True) needs max_decode_length (the cache length) and "
                       "no dropout_keys (decoding is deterministic).")
    dtype = jnp.dtype(cfg.dtype)
    decoder_input_tokens = nn.with_logical_constraint(decoder_input_tokens, ("batch", "length"))
    x = self.token_embedder(decoder_input_tokens).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = t5.dropout(x, cfg.dropout_rate, _fold_in_each(dropout_keys, _EMBEDDING_SITE),
                   site=0)

    # With a cache, the biases are those of the full length; each attention takes its row.
    length = max_decode_length if decode else decoder_input_tokens.shape[1]
    position_bias = t5.RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        bidirectional=False, name="relpos_bias")(length)
    self_mask_bias = causal_mask_bias(length)
    cross_mask_bias = jnp.where((encoder_input_tokens != t5.PAD_ID)[:, None, None, :], 0.0,
                                jnp.finfo(jnp.float32).min)

    # Rematerialisation only matters for gradients; decoding runs the plain layer.
    layer_cls = DecoderLayer if decode else remat_layer(DecoderLayer, cfg)
    layer_keys = [_fold_in_each(dropout_keys, _FIRST_LAYER + i)
                  for i in range(self.num_layers)]
    if cfg.scan_layers:
      stacked_keys = None if dropout_keys is None else jnp.stack(layer_keys)
      # The cache of each layer is stacked like its params (leading [num_layers] axis).
      scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, scanned=True, decode=decode, name="layers")(
          x, encoded, position_bias, self_mask_bias, cross_mask_bias, stacked_keys)
    else:
      for i in range(self.num_layers):
        x = layer_cls(cfg, decode=decode, name=f"layers_{i}")(
            x, encoded, position_bias, self_mask_bias, cross_mask_bias, layer_keys[i])

    x = t5.RMSNorm(cfg.layer_norm_epsilon, dtype, name="decoder_norm")(x)
    x = t5.dropout(x, cfg.dropout_rate, _fold_in_each(dropout_keys, _FINAL_SITE), site=0)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if logits_position is not None:
      x = jax.lax.dynamic_slice_in_dim(x, logits_position, 1, axis=1)
    if self.tie_word_embeddings:
      # Original T5: the embedding table is the head; the rescaling keeps logits O(1) with an
      # embedding initialised at unit scale.
      embedding = nn.meta.unbox(self.token_embedder.get_variable("params", "embedding"))
      x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
      logits = jnp.einsum("bld,vd->blv", x, embedding.astype(dtype),
                          preferred_element_type=jnp.float32)
    else:
      # As T5X: the matmul in the activation dtype, the logits then cast to float32.
      logits = t5.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                        name="logits_dense")(x).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
  """T5 encoder-decoder: `encode`, `decode` and `__call__` (both, for training)."""

  config: EncoderDecoderConfig

  def setup(self):
    t5_config = self.config.t5
    dtype = jnp.dtype(t5_config.dtype)
    # Attribute names are the parameter-tree names; the embedder first, as both stacks use it.
    self.token_embedder = t5.Embed(t5_config.vocab_size, t5_config.d_model, dtype)
    self.encoder = t5.T5Encoder(t5_config, token_embedder=self.token_embedder)
    self.decoder = T5Decoder(t5_config, self.config.decoder_layers,
                             self.config.tie_word_embeddings, token_embedder=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, dropout_keys: Array | None = None) -> Array:
    """int32 [b, s] (0 = padding) -> [b, s, d_model]; dropout with [b, 2] keys, None: none."""
    return self.encoder(encoder_input_tokens, deterministic=dropout_keys is None,
                        dropout_keys=dropout_keys)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             dropout_keys: Array | None = None, logits_position: Array | None = None,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Next-token logits, float32 [b, l, vocab] (or [b, 1, vocab] at `logits_position`), given
    `encode`'s output; with `decode`, one position at a time from a key/value cache (mutable
    'cache'; see `T5Decoder` and `decoding.init_cache`)."""
    return self.decoder(decoder_input_tokens, encoded, encoder_input_tokens, dropout_keys,
                        logits_position, decode, max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               deterministic: bool = True, example_rows: Array | None = None) -> Array:
    """Teacher-forced next-token logits.

    Args:
      encoder_input_tokens: int32 [b, s] inputs, 0 = padding.
      decoder_input_tokens: int32 [b, l] `shift_right(targets)`.
      deterministic: disables dropout (needs a 'dropout' rng when False).
      example_rows: int [b] rows of these examples in the global batch, which key their dropout
        masks; None: 0..b-1.

    Returns:
      float32 [b, l, vocab_size]; position i predicts targets[:, i].
    """
    encoder_keys = decoder_keys = None
    if not deterministic:
      rows = jnp.arange(encoder_input_tokens.shape[0]) if example_rows is None else example_rows
      keys = t5.fold_in_rows(self.make_rng("dropout"), rows)
      encoder_keys = _fold_in_each(keys, _ENCODER_KEY)
      decoder_keys = _fold_in_each(keys, _DECODER_KEY)
    encoded = self.encode(encoder_input_tokens, encoder_keys)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_keys)


def encoder_params(params: dict[str, Any]) -> dict[str, Any]:
  """The standalone `T5Encoder` tree (token_embedder included) inside `EncoderDecoder` params,
  e.g. to start a dual encoder from an infused encoder-decoder."""
  return {"token_embedder": params["token_embedder"], **params["encoder"]}
