"""Jitted greedy decoding and beam search for the T5 encoder-decoder, with a fixed maximum length.

Both encode the inputs once and then run the decoder on a fixed [n, max_length] buffer of the
tokens chosen so far (shifted right), reading the logits at the current position: the causal mask
makes them those of the prefix alone (the vocabulary head runs at the current position only).
Every step is the same compiled program (no cache to allocate, no shapes that change), at the cost
of recomputing the prefix's layers each step: O(max_length^2) decoder positions per sequence
instead of O(max_length) with a key/value cache. For the short answers of closed-book QA
(max_length 16-64) that is the simpler trade; a cache is the next step if long outputs matter.

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


def _next_token_log_probs(model: ed.EncoderDecoder, params: Any, encoded: Array,
                          encoder_input_tokens: Array, outputs: Array, position: Array) -> Array:
  """float32 [n, vocab] log p(token at `position` | outputs[:, :position], inputs).

  Args:
    model: the module.
    params: its params.
    encoded: [n, s, d] encoder outputs.
    encoder_input_tokens: int32 [n, s].
    outputs: int32 [n, L] tokens generated so far (later positions are ignored: causal mask).
    position: int32 scalar.
  """
  logits = model.apply({"params": params}, encoded, encoder_input_tokens,
                       ed.shift_right(outputs), logits_position=position,
                       method=ed.EncoderDecoder.decode)
  return jax.nn.log_softmax(logits[:, 0], axis=-1)


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

  def not_finished(state):
    position, _, done, _ = state
    return (position < max_length) & ~jnp.all(done)

  def step(state):
    position, outputs, done, scores = state
    log_probs = _next_token_log_probs(model, params, encoded, encoder_input_tokens, outputs,
                                      position)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, 0, token)
    scores = scores + jnp.where(done, 0.0, token_log_prob)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, token, position, axis=1)
    return position + 1, outputs, done | (token == eos_id), scores

  state = (jnp.int32(0), jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32))
  _, outputs, _, scores = jax.lax.while_loop(not_finished, step, state)
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
  encoded = jnp.repeat(encoded, k, axis=0)  # [b * k, s, d], beam-major within each example.
  inputs = jnp.repeat(encoder_input_tokens, k, axis=0)
  neg_inf = jnp.float32(-jnp.inf)
  is_eos = jnp.arange(vocab) == eos_id

  def extend(sequences, flat_index, position):
    """[b, k, L] sequences, int [b, m] indices into k * vocab -> [b, m, L] extended sequences."""
    parents = jnp.take_along_axis(sequences, (flat_index // vocab)[:, :, None], axis=1)
    return jax.lax.dynamic_update_index_in_dim(parents, (flat_index % vocab).astype(jnp.int32),
                                               position, axis=2)

  def step(position, state):
    live, live_scores, finished, finished_scores = state
    log_probs = _next_token_log_probs(model, params, encoded, inputs,
                                      live.reshape(batch * k, max_length), position)
    candidates = live_scores[:, :, None] + log_probs.reshape(batch, k, vocab)  # [b, k, V]
    # Ending here: EOS, or any token at the last position.
    ends = is_eos | (position == max_length - 1)
    penalty = length_penalty((position + 1).astype(jnp.float32), length_penalty_alpha)
    ending_scores = jnp.where(ends, candidates / penalty, neg_inf).reshape(batch, k * vocab)
    continuing_scores = jnp.where(is_eos, neg_inf, candidates).reshape(batch, k * vocab)

    live_scores, live_index = jax.lax.top_k(continuing_scores, k)
    new_live = extend(live, live_index, position)
    # The k best newly finished, merged with the k best so far (earlier ones first on ties).
    new_scores, new_index = jax.lax.top_k(ending_scores, k)
    pool = jnp.concatenate([finished, extend(live, new_index, position)], axis=1)
    pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)
    finished = jnp.take_along_axis(pool, keep[:, :, None], axis=1)
    return new_live, live_scores, finished, finished_scores

  zeros = jnp.zeros((batch, k, max_length), jnp.int32)
  # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
  live_scores = jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None].repeat(batch, axis=0)
  state = (zeros, live_scores, zeros, jnp.full((batch, k), neg_inf))
  _, _, finished, finished_scores = jax.lax.fori_loop(0, max_length, step, state)
  return finished, finished_scores
