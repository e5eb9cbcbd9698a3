"""Greedy decoding against Hugging Face `generate`, beam search against brute-force enumeration."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from samtone_jax.models import decoding
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import hf_import
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


# Seeds where some rows end with EOS and others run to max_length (and, with seed 2, the pad id is
# generated mid-sequence: a token like any other, as in HF).
@pytest.mark.parametrize("feed_forward_proj,tied,seed", [("gated-gelu", False, 2),
                                                         ("relu", True, 6)])
def test_greedy_matches_hf_generate(tmp_path, feed_forward_proj, tied, seed):
  # A small vocabulary, so that EOS comes early in some rows and not in others.
  vocab, max_length = 12, 9
  model = _random_hf(vocab, feed_forward_proj, tied, seed)
  model.config.save_pretrained(tmp_path)
  tensors = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
  safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
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
