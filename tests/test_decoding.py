"""Greedy decoding against Hugging Face `generate` and an uncached reference loop, beam search
against brute-force enumeration, the cached decoder's steps against the teacher-forced logits."""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from samtone_jax import partitioning
from samtone_jax.models import decoding
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import hf_import
from samtone_jax.models import seq2seq_model
from samtone_jax.models import t5
from samtone_jax.models.config import EncoderDecoderConfig, T5Config

pytestmark = pytest.mark.usefixtures("fast_compile")


def _random_hf(vocab_size: int, feed_forward_proj: str, tied: bool, seed: int):
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=10,
      feed_forward_proj=feed_forward_proj, dropout_rate=0.0, tie_word_embeddings=tied,
      decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif "relative_attention_bias" in name:
        param.copy_(torch.randn_like(param))
      else:
        param.copy_(0.5 * torch.randn_like(param))
  return model


def _uncached_greedy(config: EncoderDecoderConfig, params, inputs: np.ndarray,
                     max_length: int) -> np.ndarray:
  """The reference without a cache: at every step the whole teacher-forced model over the tokens
  chosen so far (a fixed [b, max_length] buffer; the causal mask hides later positions), argmax
  at the current position. int32 [b, max_length], 0 after EOS."""
  apply = jax.jit(ed.EncoderDecoder(config).apply)
  outputs = np.zeros((inputs.shape[0], max_length), np.int32)
  done = np.zeros(inputs.shape[0], bool)
  for position in range(max_length):
    logits = apply({"params": params}, jnp.asarray(inputs), ed.shift_right(jnp.asarray(outputs)))
    token = np.where(done, 0, np.argmax(np.asarray(logits)[:, position], axis=-1))
    outputs[:, position] = token
    done |= token == ed.EOS_ID
  return outputs


# Seeds where some rows end with EOS and others run to max_length (and, with seed 2, the pad id is
# generated mid-sequence: a token like any other, as in HF).
@pytest.mark.parametrize("feed_forward_proj,tied,seed,scan", [("gated-gelu", False, 2, False),
                                                              ("relu", True, 6, False),
                                                              ("relu", True, 6, True)])
def test_greedy_matches_hf_generate(tmp_path, feed_forward_proj, tied, seed, scan):
  # A small vocabulary, so that EOS comes early in some rows and not in others.
  vocab, max_length = 12, 9
  model = _random_hf(vocab, feed_forward_proj, tied, seed)
  model.config.save_pretrained(tmp_path)
  tensors = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
  safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  if scan:
    config = dataclasses.replace(config, t5=dataclasses.replace(config.t5, scan_layers=True))
    params = t5.stack_layers(params)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, vocab, size=(6, 7)).astype(np.int32)
  for row, length in enumerate([7, 5, 3, 6, 2, 7]):
    inputs[row, length:] = 0
  with torch.no_grad():
    expected = model.generate(
        input_ids=torch.as_tensor(inputs, dtype=torch.long),
        attention_mask=torch.as_tensor((inputs != 0).astype(np.int64)),
        do_sample=False, num_beams=1, max_new_tokens=max_length, decoder_start_token_id=0,
        eos_token_id=ed.EOS_ID, pad_token_id=0).numpy()[:, 1:]  # Drop the start token.
  expected = np.pad(expected, ((0, 0), (0, max_length - expected.shape[1])))
  tokens, scores = decoding.greedy_decode(config, params, jnp.asarray(inputs), max_length)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  np.testing.assert_array_equal(_uncached_greedy(config, params, inputs, max_length), expected)
  ended = (expected == ed.EOS_ID).any(axis=1)
  assert ended.any() and not ended.all()  # Both paths are exercised.
  # The scores are the teacher-forced log-probabilities of the decoded tokens.
  logits = ed.EncoderDecoder(config).apply({"params": params}, jnp.asarray(inputs),
                                           ed.shift_right(tokens))
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  picked = np.take_along_axis(log_probs, np.asarray(tokens)[:, :, None], axis=-1)[:, :, 0]
  upto_eos = np.cumsum(np.asarray(tokens) == ed.EOS_ID, axis=1) - (
      np.asarray(tokens) == ed.EOS_ID) == 0
  np.testing.assert_allclose(scores, (picked * upto_eos).sum(axis=1), rtol=1e-5, atol=1e-5)


# A vocabulary of 5 (0 = pad, 1 = EOS) and 3 steps: 1 + 4 + 4 * 4 * 5 = 85 complete sequences.
TINY = EncoderDecoderConfig(
    t5=T5Config(vocab_size=5, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=10,
                dropout_rate=0.0, feed_forward_proj="gated-gelu"))
MAX_LENGTH = 3


def _complete_sequences(vocab: int, max_length: int) -> np.ndarray:
  """Every sequence beam search can return: ends with EOS before max_length, or has no EOS and
  max_length tokens (any last token); zero-padded. int32 [n, max_length]."""
  sequences = []
  others = [t for t in range(vocab) if t != ed.EOS_ID]
  for length in range(1, max_length + 1):
    for prefix in itertools.product(others, repeat=length - 1):
      lasts = [ed.EOS_ID] if length < max_length else range(vocab)
      for last in lasts:
        sequences.append(list(prefix) + [last] + [0] * (max_length - length))
  return np.asarray(sequences, np.int32)


def _brute_force_scores(params, inputs: np.ndarray, alpha: float):
  """[n] complete sequences and their [b, n] scores: the teacher-forced sum of log-probs of the
  tokens up to and including EOS, divided by ((5 + length) / 6)^alpha."""
  sequences = _complete_sequences(TINY.t5.vocab_size, MAX_LENGTH)
  n = len(sequences)
  b = inputs.shape[0]
  tiled_inputs = jnp.asarray(np.repeat(inputs, n, axis=0))
  tiled_sequences = np.tile(sequences, (b, 1))
  logits = ed.EncoderDecoder(TINY).apply({"params": params}, tiled_inputs,
                                         ed.shift_right(jnp.asarray(tiled_sequences)))
  log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
  picked = np.take_along_axis(log_probs, tiled_sequences[:, :, None], axis=-1)[:, :, 0]
  is_eos = sequences == ed.EOS_ID
  lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, MAX_LENGTH)
  counted = np.arange(MAX_LENGTH)[None, :] < lengths[:, None]
  totals = (picked.reshape(b, n, MAX_LENGTH) * counted[None]).sum(axis=-1)
  return sequences, totals / ((5.0 + lengths) / 6.0) ** alpha


def _tiny_model():
  inputs = np.array([[3, 4, 2, 2, 0, 0], [2, 3, 0, 0, 0, 0], [4, 4, 3, 2, 3, 4]], np.int32)
  params = nn.meta.unbox(ed.EncoderDecoder(TINY).init(
      jax.random.PRNGKey(4), jnp.asarray(inputs), jnp.zeros((3, MAX_LENGTH), jnp.int32))["params"])
  # Sharper distributions than the init's, so that beams disagree with greedy choices.
  return inputs, jax.tree.map(lambda x: x * 2.0, params)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_exhaustive_beam_equals_brute_force(alpha):
  inputs, params = _tiny_model()
  sequences, scores = _brute_force_scores(params, inputs, alpha)
  # (vocab - 1)^(max_length - 1) = 16 live prefixes: nothing is pruned.
  beam = 16
  found, found_scores = decoding.beam_search(TINY, params, jnp.asarray(inputs), MAX_LENGTH,
                                             beam, length_penalty_alpha=alpha)
  for row in range(inputs.shape[0]):
    order = np.argsort(-scores[row], kind="stable")[:beam]
    np.testing.assert_allclose(found_scores[row], scores[row][order], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(found[row]), sequences[order])


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_small_beam_scores_are_those_of_its_sequences(alpha):
  inputs, params = _tiny_model()
  sequences, scores = _brute_force_scores(params, inputs, alpha)
  index = {tuple(s): i for i, s in enumerate(sequences)}
  found, found_scores = decoding.beam_search(TINY, params, jnp.asarray(inputs), MAX_LENGTH, 2,
                                             length_penalty_alpha=alpha)
  found, found_scores = np.asarray(found), np.asarray(found_scores)
  for row in range(inputs.shape[0]):
    exact = [scores[row][index[tuple(s)]] for s in found[row]]  # KeyError: not a sequence.
    np.testing.assert_allclose(found_scores[row], exact, rtol=1e-5, atol=1e-5)
    assert found_scores[row][0] >= found_scores[row][1]
    assert found_scores[row][0] <= scores[row].max() + 1e-5


def test_bad_lengths_are_refused():
  inputs, params = _tiny_model()
  with pytest.raises(ValueError, match="max_length=0: must be at least 1"):
    decoding.greedy_decode(TINY, params, jnp.asarray(inputs), 0)
  with pytest.raises(ValueError, match="beam_size=0: must be at least 1"):
    decoding.beam_search(TINY, params, jnp.asarray(inputs), 3, 0)


def test_scanned_tied_model_decodes_the_same():
  inputs, params = _tiny_model()
  tied = dataclasses.replace(TINY, tie_word_embeddings=True)
  params = {k: v for k, v in params.items()}
  params["decoder"] = {k: v for k, v in params["decoder"].items() if k != "logits_dense"}
  scanned = dataclasses.replace(tied, t5=dataclasses.replace(tied.t5, scan_layers=True))
  expected = decoding.beam_search(tied, params, jnp.asarray(inputs), MAX_LENGTH, 3)
  found = decoding.beam_search(scanned, t5.stack_layers(params), jnp.asarray(inputs),
                               MAX_LENGTH, 3)
  np.testing.assert_array_equal(found[0], expected[0])
  np.testing.assert_allclose(found[1], expected[1], rtol=1e-5)


def _teacher_forced_scores(config, params, inputs: np.ndarray, sequences: np.ndarray,
                           alpha: float) -> np.ndarray:
  """[b, k] log-probability up to and including EOS / length penalty of [b, k, L] sequences,
  from the full (uncached) model."""
  b, k, length = sequences.shape
  flat = jnp.asarray(sequences.reshape(b * k, length))
  logits = ed.EncoderDecoder(config).apply(
      {"params": params}, jnp.asarray(np.repeat(inputs, k, axis=0)), ed.shift_right(flat))
  log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
  picked = np.take_along_axis(log_probs, np.asarray(flat)[:, :, None], axis=-1)[:, :, 0]
  is_eos = sequences.reshape(b * k, length) == ed.EOS_ID
  lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, length)
  counted = np.arange(length)[None, :] < lengths[:, None]
  return ((picked * counted).sum(axis=1) / ((5.0 + lengths) / 6.0) ** alpha).reshape(b, k)


@pytest.mark.parametrize("scan", [False, True])
def test_longer_beam_scores_are_those_of_its_sequences(scan):
  """Over 8 steps the beams reorder many times: a cache row gathered from the wrong parent would
  give a score that is not its sequence's teacher-forced one."""
  config = dataclasses.replace(TINY, t5=dataclasses.replace(TINY.t5, scan_layers=scan))
  inputs, params = _tiny_model()
  if scan:
    params = t5.stack_layers(params)
  max_length, beam, alpha = 8, 3, 0.6
  found, found_scores = decoding.beam_search(config, params, jnp.asarray(inputs), max_length,
                                             beam, length_penalty_alpha=alpha)
  found, found_scores = np.asarray(found), np.asarray(found_scores)
  lengths = np.where((found == ed.EOS_ID).any(-1), (found == ed.EOS_ID).argmax(-1) + 1,
                     max_length)
  assert len(set(lengths.ravel())) > 1  # Sequences ending at different steps.
  np.testing.assert_allclose(found_scores,
                             _teacher_forced_scores(config, params, inputs, found, alpha),
                             rtol=1e-5, atol=1e-5)
  assert (np.diff(found_scores, axis=1) <= 0).all()


def _random_config(feed_forward_proj: str, tied: bool, scan: bool) -> EncoderDecoderConfig:
  # max_distance 6 < the 12 decoder positions: exact, logarithmic and clipped buckets occur.
  return EncoderDecoderConfig(
      t5=T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=6,
                  dropout_rate=0.0, feed_forward_proj=feed_forward_proj, scan_layers=scan),
      num_decoder_layers=3, tie_word_embeddings=tied)


@pytest.mark.parametrize("feed_forward_proj,tied,scan", [("relu", True, False),
                                                         ("gated-gelu", False, False),
                                                         ("gated-gelu", False, True)])
def test_cached_steps_equal_teacher_forced_logits(feed_forward_proj, tied, scan):
  config = _random_config(feed_forward_proj, tied, scan)
  length = 12
  rng = np.random.default_rng(1)
  inputs = rng.integers(2, 32, size=(3, 7)).astype(np.int32)
  for row, real in enumerate([7, 4, 2]):  # Padded encoder inputs.
    inputs[row, real:] = 0
  targets = jnp.asarray(rng.integers(1, 32, size=(3, length)).astype(np.int32))
  model = ed.EncoderDecoder(config)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(inputs), targets)["params"])
  # Relative-position tables at a scale where the buckets change the logits.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 3.0 if "relpos_bias" in str(path) else x, params)
  expected = np.asarray(model.apply({"params": params}, jnp.asarray(inputs),
                                    ed.shift_right(targets)))
  encoded = model.apply({"params": params}, jnp.asarray(inputs), method=ed.EncoderDecoder.encode)
  cache = decoding.init_cache(model, params, encoded, jnp.asarray(inputs), length)
  # The documented layout: [b, L, h, d_kv] per layer (a leading [layers] axis when scanned).
  layer = cache["decoder"]["layers" if scan else "layers_0"]
  stacked = (config.decoder_layers,) if scan else ()
  assert layer["self_attention"]["cached_key"].shape == stacked + (3, length, 4, 4)
  assert layer["encoder_decoder_attention"]["cached_value"].shape == stacked + (3, 7, 4, 4)

  @jax.jit
  def step(cache, tokens):
    return model.apply({"params": params, "cache": cache}, encoded, jnp.asarray(inputs),
                       tokens[:, None], decode=True, max_decode_length=length,
                       mutable=["cache"], method=ed.EncoderDecoder.decode)

  decoder_inputs = ed.shift_right(targets)
  for position in range(length):
    logits, variables = step(cache, decoder_inputs[:, position])
    cache = variables["cache"]
    np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, position], rtol=1e-5,
                               atol=1e-5, err_msg=f"position {position}")
  layer = cache["decoder"]["layers" if scan else "layers_0"]
  np.testing.assert_array_equal(layer["self_attention"]["cache_index"],
                                np.full(stacked, length))
  assert expected.std() > 0.5  # Logits large enough for the comparison to mean something.


def test_cached_step_refuses_more_than_one_position():
  config = _random_config("relu", False, False)
  model = ed.EncoderDecoder(config)
  inputs = jnp.ones((2, 5), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), inputs, inputs)["params"])
  encoded = model.apply({"params": params}, inputs, method=ed.EncoderDecoder.encode)
  cache = decoding.init_cache(model, params, encoded, inputs, 6)
  with pytest.raises(ValueError, match="one position per call, got inputs of length 2"):
    model.apply({"params": params, "cache": cache}, encoded, inputs, inputs[:, :2], decode=True,
                max_decode_length=6, mutable=["cache"], method=ed.EncoderDecoder.decode)
  with pytest.raises(ValueError, match="needs max_decode_length"):
    model.apply({"params": params, "cache": cache}, encoded, inputs, inputs[:, :1], decode=True,
                mutable=["cache"], method=ed.EncoderDecoder.decode)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_sharded_4x2_mesh_decodes_as_one_device(beam_size):
  """`predict_batch` (the predict command's and closed_book_qa's decode) with params sharded by
  their logical axes over a (data 4, model 2) mesh: the cache's constraints shard its batch and
  heads; the tokens and scores are those of one device."""
  config = _random_config("gated-gelu", False, False)
  model = seq2seq_model.EncoderDecoderModel(config)
  rng = np.random.default_rng(3)
  inputs = rng.integers(2, 32, size=(8, 7)).astype(np.int32)
  for row in range(8):
    inputs[row, 2 + row % 5:] = 0
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                 partitioning.MESH_AXES)
  decode = jax.jit(functools.partial(model.predict_batch, max_length=6, beam_size=beam_size))
  results = []
  for mesh in (one_device, partitioning.create_mesh(4, 2)):
    params, _ = partitioning.sharded_init(model.init_variables, mesh, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 2.0, params["params"])  # Sharper: beams disagree.
    batch = {seq2seq_model.ENCODER_INPUT_TOKENS: jax.device_put(
        inputs, partitioning.data_sharding(mesh, 2))}
    with partitioning.mesh_context(mesh):
      results.append(jax.device_get(decode(params, batch)))
  (tokens, scores), (s_tokens, s_scores) = results
  np.testing.assert_array_equal(s_tokens, tokens)
  np.testing.assert_allclose(s_scores, scores, rtol=1e-5, atol=1e-5)
  assert len({tuple(t) for t in tokens}) > 1  # Not one answer for every question.
