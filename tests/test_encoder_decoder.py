"""T5 encoder-decoder against Hugging Face `T5ForConditionalGeneration` on the same random weights.

Original T5 (relu, tied and rescaled head) and T5 1.1 (gated-gelu, separate head), padded inputs,
padded targets, a decoder deeper than the encoder, lengths where every kind of relative-position
bucket occurs; then the logical axis names, the scanned / rematerialised layouts and dropout.
"""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import hf_import
from samtone_jax.models import t5
from samtone_jax.models.config import DualEncoderConfig, EncoderDecoderConfig, T5Config

pytestmark = pytest.mark.usefixtures("fast_compile")

VOCAB = 64
# Longer than max_distance (12) with 16 buckets: exact, logarithmic and clipped buckets occur.
INPUT_LENGTH, TARGET_LENGTH = 20, 15


def random_hf_t5(feed_forward_proj: str, tied: bool, num_decoder_layers: int = 2,
                 seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """A tiny HF T5ForConditionalGeneration with every weight random.

  Untied (T5 1.1) models get a separate random `lm_head`: transformers 5 always shares the
  tensor and only skips the rescaling, so the head is replaced by a new parameter here.
  """
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
      num_decoder_layers=num_decoder_layers, num_heads=4, relative_attention_num_buckets=16,
      relative_attention_max_distance=12, feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
      layer_norm_epsilon=1e-6, tie_word_embeddings=tied)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif "relative_attention_bias" in name:
        param.copy_(torch.randn_like(param))  # Large enough that every bucket matters.
      else:
        param.copy_(0.3 * torch.randn_like(param))
  return model


def save(model: transformers.T5ForConditionalGeneration, directory: pathlib.Path) -> None:
  """config.json and model.safetensors with every parameter (lm_head included when separate)."""
  directory.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(directory)
  tensors = {name: param.detach().clone().contiguous()
             for name, param in model.named_parameters()}
  if model.lm_head.weight is not model.shared.weight:
    tensors["lm_head.weight"] = model.lm_head.weight.detach().clone().contiguous()
  safetensors.torch.save_file(tensors, directory / "model.safetensors")


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """int32 inputs [3, INPUT_LENGTH] and targets [3, TARGET_LENGTH], trailing 0 padding."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, VOCAB, size=(3, INPUT_LENGTH)).astype(np.int32)
  targets = rng.integers(2, VOCAB, size=(3, TARGET_LENGTH)).astype(np.int32)
  for row, (n_in, n_out) in enumerate([(INPUT_LENGTH, TARGET_LENGTH), (13, 6), (4, 11)]):
    inputs[row, n_in:] = 0
    targets[row, n_out - 1] = ed.EOS_ID
    targets[row, n_out:] = 0
  return inputs, targets


def hf_logits(model, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
  decoder_inputs = np.array(ed.shift_right(jnp.asarray(targets)))
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(inputs, dtype=torch.long),
                attention_mask=torch.as_tensor((inputs != 0).astype(np.int64)),
                decoder_input_ids=torch.as_tensor(decoder_inputs, dtype=torch.long))
  return out.logits.float().numpy()


def our_logits(config, params, inputs, targets) -> np.ndarray:
  return np.asarray(jax.jit(ed.EncoderDecoder(config).apply)(
      {"params": params}, jnp.asarray(inputs), ed.shift_right(jnp.asarray(targets))))


@pytest.mark.parametrize("feed_forward_proj,tied,num_decoder_layers", [
    ("relu", True, 2), ("gated-gelu", False, 3), ("gated-gelu", True, 2), ("relu", False, 2)])
def test_logits_match_hf(tmp_path, feed_forward_proj, tied, num_decoder_layers):
  model = random_hf_t5(feed_forward_proj, tied, num_decoder_layers)
  save(model, tmp_path)
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  assert config == EncoderDecoderConfig(
      t5=T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=16,
                  relative_attention_max_distance=12, dropout_rate=0.0),
      num_decoder_layers=None if num_decoder_layers == 2 else num_decoder_layers,
      tie_word_embeddings=tied)
  assert ("logits_dense" in params["decoder"]) == (not tied)
  inputs, targets = padded_batch()
  ours = our_logits(config, params, inputs, targets)
  expected = hf_logits(model, inputs, targets)
  valid = targets != 0
  np.testing.assert_allclose(ours[valid], expected[valid], rtol=1e-4, atol=1e-4)
  assert expected[valid].std() > 0.1  # Not trivially small: the comparison means something.
  # Trailing target padding changes no real position (causal mask), as trailing input padding.
  longer = np.pad(targets, ((0, 0), (0, 5)))
  wider = np.pad(inputs, ((0, 0), (0, 3)))
  np.testing.assert_allclose(our_logits(config, params, wider, longer)[:, :TARGET_LENGTH][valid],
                             ours[valid], rtol=1e-4, atol=1e-4)


def test_transformers5_shared_head_file_imports_as_untied(tmp_path):
  """transformers 5 writes a T5 1.1 model as one shared tensor and scale_decoder_outputs=false."""
  model = random_hf_t5("gated-gelu", tied=False)
  model.lm_head.weight = model.shared.weight  # One tensor, no rescaling: what transformers 5 runs.
  model.save_pretrained(tmp_path)
  assert not json.loads((tmp_path / "config.json").read_text())["scale_decoder_outputs"]
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  assert not config.tie_word_embeddings
  inputs, targets = padded_batch(1)
  valid = targets != 0
  np.testing.assert_allclose(our_logits(config, params, inputs, targets)[valid],
                             hf_logits(model, inputs, targets)[valid], rtol=1e-4, atol=1e-4)


def test_import_rejects_mismatched_config(tmp_path):
  model = random_hf_t5("relu", tied=True)
  save(model, tmp_path)
  config = hf_import.encoder_decoder_config_from_hf(tmp_path)
  with pytest.raises(ValueError, match=r"config.json: decoder_layers=2 .* decoder_layers=3"):
    hf_import.import_t5_encoder_decoder(
        tmp_path, dataclasses.replace(config, num_decoder_layers=3))
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    hf_import.import_t5_encoder_decoder(
        tmp_path, dataclasses.replace(config, tie_word_embeddings=False))


TINY = EncoderDecoderConfig(
    t5=T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                relative_attention_num_buckets=16, relative_attention_max_distance=12,
                dropout_rate=0.0),
    num_decoder_layers=1)


def _flat_specs(config, inputs, targets):
  abstract = jax.eval_shape(ed.EncoderDecoder(config).init, jax.random.PRNGKey(0), inputs,
                            targets)["params"]
  specs = nn.get_partition_spec(abstract)
  leaves = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  shapes = jax.tree.leaves(nn.meta.unbox(abstract))
  return {"/".join(p.key for p in path): (tuple(spec), leaf.shape)
          for (path, spec), leaf in zip(leaves, shapes)}


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_carry_logical_axes(tied):
  config = dataclasses.replace(TINY, tie_word_embeddings=tied)
  tokens = jnp.ones((2, 5), jnp.int32)
  flat = _flat_specs(config, tokens, tokens)
  # Every parameter has one logical name per dimension.
  assert all(len(spec) == len(shape) and all(spec) for spec, shape in flat.values())
  decoder = {k[len("decoder/"):]: v for k, v in flat.items() if k.startswith("decoder/")}
  expected = {
      "relpos_bias/rel_embedding": (("heads", "relpos_buckets"), (2, 16)),
      "layers_0/pre_self_attention_layer_norm/scale": (("embed",), (16,)),
      "layers_0/pre_cross_attention_layer_norm/scale": (("embed",), (16,)),
      "layers_0/pre_mlp_layer_norm/scale": (("embed",), (16,)),
      "layers_0/mlp/wi_0/kernel": (("embed", "mlp"), (16, 24)),
      "layers_0/mlp/wi_1/kernel": (("embed", "mlp"), (16, 24)),
      "layers_0/mlp/wo/kernel": (("mlp", "embed"), (24, 16)),
      "decoder_norm/scale": (("embed",), (16,)),
  }
  for attention in ("self_attention", "encoder_decoder_attention"):
    for name in ("query", "key", "value"):
      expected[f"layers_0/{attention}/{name}/kernel"] = (("embed", "heads"), (16, 8))
    expected[f"layers_0/{attention}/out/kernel"] = (("heads", "embed"), (8, 16))
  if not tied:
    expected["logits_dense/kernel"] = (("embed", "vocab"), (16, 40))
  assert decoder == expected
  assert flat["token_embedder/embedding"] == (("vocab", "embed"), (40, 16))
  assert "encoder/token_embedder/embedding" not in flat  # One embedding for both stacks.
  assert {k for k in flat if k.startswith("encoder/")} == {
      f"encoder/{k}" for k in _flat_specs_encoder(config.t5)}


def _flat_specs_encoder(config: T5Config):
  abstract = nn.meta.unbox(jax.eval_shape(t5.T5Encoder(config).init, jax.random.PRNGKey(0),
                                          jnp.ones((2, 5), jnp.int32))["params"])
  return {"/".join(p.key for p in path) for path, _ in
          jax.tree_util.tree_flatten_with_path(abstract)[0]
          if path[0].key != "token_embedder"}


def _tiny_batch():
  rng = np.random.default_rng(3)
  inputs = rng.integers(1, 40, size=(2, 9)).astype(np.int32)
  targets = rng.integers(1, 40, size=(2, 7)).astype(np.int32)
  inputs[1, 5:] = 0
  targets[1, 4:] = 0
  return jnp.asarray(inputs), ed.shift_right(jnp.asarray(targets))


def test_scan_and_remat_give_the_same_values_and_gradients():
  inputs, decoder_inputs = _tiny_batch()
  config = dataclasses.replace(TINY, t5=dataclasses.replace(TINY.t5, dropout_rate=0.2))
  params = nn.meta.unbox(ed.EncoderDecoder(config).init(jax.random.PRNGKey(0), inputs,
                                                        decoder_inputs)["params"])

  def loss(p, cfg):
    logits = ed.EncoderDecoder(cfg).apply({"params": p}, inputs, decoder_inputs,
                                          deterministic=False,
                                          rngs={"dropout": jax.random.PRNGKey(5)})
    return jnp.sum(jnp.sin(logits))

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain_value, plain_grad = grad_fn(params, config)
  scanned = dataclasses.replace(config, t5=dataclasses.replace(
      config.t5, scan_layers=True, remat=True, remat_policy="dots"))
  value, grad = grad_fn(t5.stack_layers(params), scanned)
  # Same dropout masks (per-example keys, not module paths) and the same arithmetic.
  np.testing.assert_allclose(value, plain_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               t5.unstack_layers(grad), plain_grad)
  # Dropout is on: the value differs from the deterministic one.
  deterministic = jnp.sum(jnp.sin(ed.EncoderDecoder(config).apply(
      {"params": params}, inputs, decoder_inputs)))
  assert abs(float(deterministic) - float(plain_value)) > 1e-3


def test_dropout_masks_follow_the_example_not_the_batch():
  inputs, decoder_inputs = _tiny_batch()
  config = dataclasses.replace(TINY, t5=dataclasses.replace(TINY.t5, dropout_rate=0.3))
  module = ed.EncoderDecoder(config)
  params = module.init(jax.random.PRNGKey(0), inputs, decoder_inputs)["params"]
  rngs = {"dropout": jax.random.PRNGKey(7)}
  whole = module.apply({"params": params}, inputs, decoder_inputs, deterministic=False, rngs=rngs)
  row_1 = module.apply({"params": params}, inputs[1:], decoder_inputs[1:], deterministic=False,
                       example_rows=jnp.array([1]), rngs=rngs)
  np.testing.assert_allclose(row_1[0], whole[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 12), (8, 16)])
def test_unidirectional_buckets_match_hf(num_buckets, max_distance):
  positions = np.arange(-400, 401)
  ours = t5.relative_position_bucket(positions, num_buckets, max_distance, bidirectional=False)
  expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      torch.as_tensor(positions), bidirectional=False, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, expected)
  # Later keys (masked by the causal mask) share bucket 0 with the query's own position.
  assert np.all(ours[positions >= 0] == 0)


def test_import_into_scanned_layout_and_bfloat16(tmp_path):
  model = random_hf_t5("gated-gelu", tied=False, num_decoder_layers=3, seed=4)
  save(model, tmp_path)
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  scanned_config = dataclasses.replace(config, t5=dataclasses.replace(config.t5,
                                                                      scan_layers=True))
  _, scanned = hf_import.import_t5_encoder_decoder(tmp_path, scanned_config)
  assert scanned["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 48, 32)
  jax.tree.map(np.testing.assert_array_equal, scanned, t5.stack_layers(params))
  # bfloat16 activations (float32 params, norms, softmax and logits) err no more than HF in
  # bfloat16 (5 layers of random weights: both are ~15% off float32).
  bf16_config = dataclasses.replace(config, t5=dataclasses.replace(config.t5, dtype="bfloat16"))
  inputs, targets = padded_batch(5)
  valid = targets != 0
  exact = hf_logits(model, inputs, targets)[valid]
  our_error = np.abs(our_logits(bf16_config, params, inputs, targets)[valid] - exact).mean()
  hf_error = np.abs(hf_logits(model.to(torch.bfloat16), inputs, targets)[valid] - exact).mean()
  assert our_error <= 1.05 * hf_error
  assert our_error < 0.25 * np.abs(exact).mean()


def test_encoder_params_start_a_dual_encoder(tmp_path):
  """The bridge: an encoder-decoder's encoder (token embedder included) is a standalone
  `T5Encoder` tree, which `hf_import.dual_encoder_params` lays into any tower-sharing mode."""
  model = random_hf_t5("gated-gelu", tied=False, seed=6)
  save(model, tmp_path)
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  encoder = ed.encoder_params(params)
  _, reference = hf_import.import_t5_encoder(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, encoder, reference)
  inputs, _ = padded_batch(6)
  encoded = ed.EncoderDecoder(config).apply({"params": params}, jnp.asarray(inputs),
                                            method=ed.EncoderDecoder.encode)
  standalone = t5.T5Encoder(config.t5).apply({"params": encoder}, jnp.asarray(inputs))
  np.testing.assert_allclose(encoded, standalone, rtol=1e-6, atol=1e-6)
  dual = hf_import.dual_encoder_params(
      DualEncoderConfig(encoder=config.t5, tower_sharing="ade"), encoder)
  assert set(dual) == {"query_token_embedder", "document_token_embedder", "query_encoder",
                       "document_encoder"}
