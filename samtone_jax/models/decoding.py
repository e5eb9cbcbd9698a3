"""Jitted greedy decoding and beam search for the T5 encoder-decoder, with a fixed maximum length.

Both encode the inputs once, then decode incrementally with a key/value cache (`init_cache`,
t5x's `decode=True`): the decoder runs one position per step, each layer's self-attention reading
the keys and values of the earlier positions from its cache and adding its own, the
cross-attention reading the encoder outputs' keys and values projected once per call. That is
O(max_length) decoder positions per sequence, the attention of step i over the max_length cached
slots (later ones masked). Every step is the same compiled program: the cache has its full
length from the start. The logits of a step equal those of the teacher-forced decoder at that
position (tests/test_decoding.py checks it to 1e-5). Beam search keeps one cache row per beam
(the example's rows tiled beam_size times) and gathers the self-attention rows of the chosen
parents after every step; the cross-attention rows, equal for every beam of an example, are not
moved. There is no uncached path here: the loop that re-ran the decoder over the whole prefix
every step is the peer in `benchmarks/decode_cache.py` and the reference in the tests.

Conventions (T5's): the decoder starts from token 0 (`encoder_decoder.DECODER_START_ID`),
a sequence ends with `eos_id` (1), positions after it hold 0. Scores are sums of the natural-log
probabilities of the generated tokens, EOS included.

Beam search keeps `beam_size` live (unfinished) prefixes and the `beam_size` best finished
sequences per example. A sequence finishes when it emits EOS, or when it reaches max_length (then
without EOS, as Hugging Face's beam search finalises its unfinished beams; T5X's prefers any EOS
sequence over those). Finished sequences are ranked by log-probability / ((5 + length) / 6)^alpha
(GNMT's length penalty, T5X's `brevity_penalty`; alpha = 0 ranks by log-probability), length
counting the EOS. With beam_size >= (vocab_size - 1)^(max_length - 1) the search is exhaustive
(tests/test_decoding.py checks it against brute-force enumeration).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models.config import EncoderDecoderConfig

Array = jax.Array


def _check(max_length: int, beam_size: int = 1) -> None:
  if max_length < 1:
    raise ValueError(f"max_length={max_length}: must be at least 1 (tokens to generate, EOS "
                     "included).")
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}: must be at least 1.")


def init_cache(model: ed.EncoderDecoder, params: Any, encoded: Array,
               encoder_input_tokens: Array, max_length: int) -> Any:
  """The decoder's key/value cache before the first step.

  Args:
    model: the module.
    params: its params.
    encoded: [n, s, d] encoder outputs.
    encoder_input_tokens: int32 [n, s].
    max_length: the number of positions the cache holds.

  Returns:
    The 'cache' collection: per decoder layer, `self_attention/{cached_key, cached_value}`
    zeros [n, max_length, h, d_kv] and `cache_index` 0, `encoder_decoder_attention/{cached_key,
    cached_value}` [n, s, h, d_kv] of `encoded`; with scan_layers, one `layers` subtree whose
    leaves have a leading [num_layers] axis.
  """
  # The full-length call only sizes the cache (and projects `encoded`); its logits are unused,
  # so under jit XLA drops that decoder pass.
  _, variables = model.apply(
      {"params": params}, encoded, encoder_input_tokens,
      jnp.zeros((encoded.shape[0], max_length), jnp.int32), decode=True,
      max_decode_length=max_length, mutable=["cache"], method=ed.EncoderDecoder.decode)
  return variables["cache"]


def _next_token_log_probs(model: ed.EncoderDecoder, params: Any, cache: Any, encoded: Array,
                          encoder_input_tokens: Array, tokens: Array, max_length: int
                          ) -> tuple[Array, Any]:
  """One cached decoder step: float32 [n, vocab] log p(next token | prefix, inputs), new cache.

  Args:
    model: the module.
    params: its params.
    cache: `init_cache`'s collection after as many steps as the prefix has tokens.
    encoded: [n, s, d] encoder outputs (not read: the cache holds their keys and values).
    encoder_input_tokens: int32 [n, s] (their padding is masked).
    tokens: int32 [n] the prefix's last token (DECODER_START_ID at the first step).
    max_length: the cache length.
  """
  logits, variables = model.apply(
      {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens[:, None],
      decode=True, max_decode_length=max_length, mutable=["cache"],
      method=ed.EncoderDecoder.decode)
  return jax.nn.log_softmax(logits[:, 0], axis=-1), variables["cache"]


def _map_cache_rows(fn, cache: Any, scanned: bool, self_attention_only: bool = False) -> Any:
  """Applies `fn(leaf, batch_axis)` to the cache's key/value leaves (not `cache_index`).

  The batch axis is 0, or 1 behind the layer axis of a scanned stack. With
  `self_attention_only`, the cross-attention leaves are returned unchanged.
  """
  def leaf(path, x):
    names = [getattr(k, "key", None) for k in path]
    if names[-1] == "cache_index" or (self_attention_only and "self_attention" not in names):
      return x
    return fn(x, 1 if scanned else 0)
  return jax.tree_util.tree_map_with_path(leaf, cache)


@functools.partial(jax.jit, static_argnames=("config", "max_length", "eos_id"))
def greedy_decode(config: EncoderDecoderConfig, params: Any, encoder_input_tokens: Array,
                  max_length: int, eos_id: int = ed.EOS_ID) -> tuple[Array, Array]:
  """The most likely next token at every step, until EOS or max_length.

  Args:
    config: the model's config.
    params: the `EncoderDecoder` params.
    encoder_input_tokens: int32 [b, s], 0 = padding.
    max_length: number of tokens to generate at most (EOS included).
    eos_id: the end-of-sequence id.

  Returns:
    (tokens int32 [b, max_length] with 0 after EOS, scores float32 [b]: log-probability of the
    tokens up to and including EOS). Stops early once every row has ended.

  Raises:
    ValueError: max_length below 1.
  """
  _check(max_length)
  model = ed.EncoderDecoder(config)
  encoded = model.apply({"params": params}, encoder_input_tokens,
                        method=ed.EncoderDecoder.encode)
  batch = encoder_input_tokens.shape[0]
  cache = init_cache(model, params, encoded, encoder_input_tokens, max_length)

  def not_finished(state):
    position, _, _, _, done, _ = state
    return (position < max_length) & ~jnp.all(done)

  def step(state):
    position, last_token, cache, outputs, done, scores = state
    log_probs, cache = _next_token_log_probs(model, params, cache, encoded,
                                             encoder_input_tokens, last_token, max_length)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, token_log_prob)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, token, position, axis=1)
    return position + 1, token, cache, outputs, done | (token == eos_id), scores

  state = (jnp.int32(0), jnp.full((batch,), ed.DECODER_START_ID, jnp.int32), cache,
           jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32))
  _, _, _, outputs, _, scores = jax.lax.while_loop(not_finished, step, state)
  return outputs, scores


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT / T5X brevity penalty ((5 + length) / 6)^alpha; a score is log-prob / this."""
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("config", "max_length", "beam_size",
                                             "length_penalty_alpha", "eos_id"))
def beam_search(config: EncoderDecoderConfig, params: Any, encoder_input_tokens: Array,
                max_length: int, beam_size: int, length_penalty_alpha: float = 0.6,
                eos_id: int = ed.EOS_ID) -> tuple[Array, Array]:
  """Beam search with a fixed maximum length (see the module docstring for the ranking).

  Args:
    config: the model's config.
    params: the `EncoderDecoder` params.
    encoder_input_tokens: int32 [b, s], 0 = padding.
    max_length: number of tokens to generate at most (EOS included).
    beam_size: k, the live prefixes kept per example, and the finished sequences returned.
    length_penalty_alpha: alpha of the length penalty; 0 ranks by log-probability.
    eos_id: the end-of-sequence id.

  Returns:
    (sequences int32 [b, k, max_length] with 0 after EOS, best first; scores float32 [b, k]:
    log-probability / length_penalty). Slots beyond the number of distinct finished sequences
    (only with tiny vocabularies) have score -inf.

  Raises:
    ValueError: max_length or beam_size below 1.
  """
  _check(max_length, beam_size)
  model = ed.EncoderDecoder(config)
  batch, k, vocab = encoder_input_tokens.shape[0], beam_size, config.t5.vocab_size
  encoded = model.apply({"params": params}, encoder_input_tokens,
                        method=ed.EncoderDecoder.encode)
  scanned = config.t5.scan_layers
  # One cache row per beam, [b * k, ...] beam-major within each example, like the inputs; the
  # cross-attention keys/values are projected once per example, then tiled.
  cache = _map_cache_rows(lambda x, axis: jnp.repeat(x, k, axis=axis),
                          init_cache(model, params, encoded, encoder_input_tokens, max_length),
                          scanned)
  encoded = jnp.repeat(encoded, k, axis=0)  # [b * k, s, d] (not read: the cache has it).
  inputs = jnp.repeat(encoder_input_tokens, k, axis=0)
  neg_inf = jnp.float32(-jnp.inf)
  is_eos = jnp.arange(vocab) == eos_id

  def extend(sequences, flat_index, position):
    """[b, k, L] sequences, int [b, m] indices into k * vocab -> [b, m, L] extended sequences."""
    parents = jnp.take_along_axis(sequences, (flat_index // vocab)[:, :, None], axis=1)
    return jax.lax.dynamic_update_index_in_dim(parents, (flat_index % vocab).astype(jnp.int32),
                                               position, axis=2)

  def step(position, state):
    live, live_scores, cache, finished, finished_scores = state
    # The live prefixes' last tokens (the start token at position 0); row j of the cache holds
    # live beam j's earlier positions.
    last = jax.lax.dynamic_index_in_dim(live, jnp.maximum(position - 1, 0), axis=2,
                                        keepdims=False)
    last = jnp.where(position == 0, ed.DECODER_START_ID, last).reshape(batch * k)
    log_probs, cache = _next_token_log_probs(model, params, cache, encoded, inputs, last,
                                             max_length)
    candidates = live_scores[:, :, None] + log_probs.reshape(batch, k, vocab)  # [b, k, V]
    # Ending here: EOS, or any token at the last position.
    ends = is_eos | (position == max_length - 1)
    penalty = length_penalty((position + 1).astype(jnp.float32), length_penalty_alpha)
    ending_scores = jnp.where(ends, candidates / penalty, neg_inf).reshape(batch, k * vocab)
    continuing_scores = jnp.where(is_eos, neg_inf, candidates).reshape(batch, k * vocab)

    live_scores, live_index = jax.lax.top_k(continuing_scores, k)
    new_live = extend(live, live_index, position)
    # The new beams' caches are their parents' (self-attention only: the cross-attention rows
    # of an example's beams are equal).
    rows = (jnp.arange(batch)[:, None] * k + live_index // vocab).reshape(batch * k)
    cache = _map_cache_rows(lambda x, axis: jnp.take(x, rows, axis=axis), cache, scanned,
                            self_attention_only=True)
    # The k best newly finished, merged with the k best so far (earlier ones first on ties).
    new_scores, new_index = jax.lax.top_k(ending_scores, k)
    pool = jnp.concatenate([finished, extend(live, new_index, position)], axis=1)
    pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)
    finished = jnp.take_along_axis(pool, keep[:, :, None], axis=1)
    return new_live, live_scores, cache, finished, finished_scores

  zeros = jnp.zeros((batch, k, max_length), jnp.int32)
  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  live_scores = jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None].repeat(batch, axis=0)
  state = (zeros, live_scores, cache, zeros, jnp.full((batch, k), neg_inf))
  _, _, _, finished, finished_scores = jax.lax.fori_loop(0, max_length, step, state)
  return finished, finished_scores
