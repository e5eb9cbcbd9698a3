"""Import of HF T5 / sentence-transformers GTR weights, checked against HF transformers (torch).

The T5 encoder must reproduce `transformers.T5EncoderModel` hidden states for the same weights
(original T5 "relu" and T5 1.1 "gated-gelu", padded batches, relative-position buckets that
matter), and a GTR directory must give HF encoder + mean pooling + Dense + Normalize.
"""

import dataclasses
import json
import pathlib
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from samtone_jax.models import hf_import
from samtone_jax.models.config import TOWER_SHARING_MODES, DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder
from samtone_jax.models.t5 import T5Encoder

# Long enough (20) against max_distance 12 and 16 buckets: exact, logarithmic and clipped buckets
# all occur in both directions.
_LENGTH = 20


def _random_hf_t5(feed_forward_proj: str, seed: int = 0) -> transformers.T5EncoderModel:
  """A tiny HF T5 encoder with every weight random (layer norms and the position bias too)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
      relative_attention_num_buckets=16, relative_attention_max_distance=12,
      feed_forward_proj=feed_forward_proj, dropout_rate=0.0, layer_norm_epsilon=1e-6)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif "relative_attention_bias" in name:
        param.copy_(torch.randn_like(param))  # Large enough that every bucket matters.
      else:
        param.copy_(0.3 * torch.randn_like(param))
  return model


def _save(model: transformers.T5EncoderModel, directory: pathlib.Path, fmt: str) -> None:
  """Writes `model` in the HF layout, as model.safetensors or the legacy pytorch_model.bin."""
  model.save_pretrained(directory)
  if fmt == "bin":
    # transformers 5 always writes safetensors; the legacy layout is a torch-saved state dict.
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def _tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A padded batch: int32 [3, _LENGTH] tokens (0 = pad) and its attention mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(3, _LENGTH)).astype(np.int32)
  for row, length in enumerate([_LENGTH, 13, 4]):
    tokens[row, length:] = 0
  return tokens, (tokens != 0).astype(np.int64)


def _hf_hidden(model, tokens, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask))
  return out.last_hidden_state.float().numpy()


@pytest.mark.parametrize("feed_forward_proj,fmt", [("relu", "safetensors"),
                                                   ("gated-gelu", "safetensors"),
                                                   ("gated-gelu", "bin")])
def test_encoder_matches_hf(tmp_path, feed_forward_proj, fmt):
  model = _random_hf_t5(feed_forward_proj)
  _save(model, tmp_path, fmt)
  config, params = hf_import.import_t5_encoder(tmp_path)
  assert config == T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                            feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=16,
                            relative_attention_max_distance=12, dropout_rate=0.0)
  tokens, mask = _tokens()
  ours = np.asarray(T5Encoder(config).apply({"params": params}, jnp.asarray(tokens)))
  expected = _hf_hidden(model, tokens, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], expected[valid], rtol=1e-4, atol=1e-4)
  # Not trivially small: the comparison above is meaningful.
  assert np.abs(expected[valid]).mean() > 0.1


def test_encoder_in_bfloat16_is_as_accurate_as_hf_in_bfloat16(tmp_path):
  """bfloat16 activations (float32 params, norms and softmax) err no more than HF in bfloat16."""
  model = _random_hf_t5("gated-gelu", seed=1)
  _save(model, tmp_path, "safetensors")
  config, params = hf_import.import_t5_encoder(
      tmp_path, hf_import.t5_config_from_hf(tmp_path, dtype="bfloat16"))
  tokens, mask = _tokens(1)
  ours = T5Encoder(config).apply({"params": params}, jnp.asarray(tokens))
  assert ours.dtype == jnp.bfloat16
  valid = mask.astype(bool)
  exact = _hf_hidden(model, tokens, mask)[valid]
  hf_bfloat16 = _hf_hidden(model.to(torch.bfloat16), tokens, mask)[valid]
  our_error = np.abs(np.asarray(ours, np.float32)[valid] - exact).mean()
  assert our_error <= np.abs(hf_bfloat16 - exact).mean()
  assert our_error < 0.1 * np.abs(exact).mean()


def test_bfloat16_safetensors_and_sharded_index(tmp_path):
  model = _random_hf_t5("gated-gelu", seed=2)
  model.save_pretrained(tmp_path / "ref")
  _, reference = hf_import.import_t5_encoder(tmp_path / "ref")
  # The same weights as bfloat16, split over two files with an index, as large checkpoints are.
  directory = tmp_path / "sharded"
  directory.mkdir()
  (directory / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  names = sorted(state)
  files = {"model-00001-of-00002.safetensors": names[::2],
           "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in files.items():
    safetensors.torch.save_file({k: state[k].contiguous() for k in keys}, directory / file)
  weight_map = {k: file for file, keys in files.items() for k in keys}
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, params = hf_import.import_t5_encoder(directory)
  expected = jax.tree.map(
      lambda x: np.asarray(torch.as_tensor(np.array(x)).to(torch.bfloat16).float()), reference)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def _write_gtr(directory: pathlib.Path, model, projection_dim: int, seed: int = 0) -> np.ndarray:
  """Writes the sentence-transformers GTR layout; returns the Dense weight [out, in]."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "0_Transformer",
       "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling",
       "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
      {"idx": 3, "name": "3", "path": "3_Normalize",
       "type": "sentence_transformers.models.Normalize"},
  ]))
  model.save_pretrained(directory / "0_Transformer")
  (directory / "0_Transformer" / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": 512, "do_lower_case": False}))
  (directory / "1_Pooling").mkdir()
  (directory / "1_Pooling" / "config.json").write_text(json.dumps({
      "word_embedding_dimension": model.config.d_model, "pooling_mode_cls_token": False,
      "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
      "pooling_mode_mean_sqrt_len_tokens": False}))
  (directory / "2_Dense").mkdir()
  (directory / "2_Dense" / "config.json").write_text(json.dumps({
      "in_features": model.config.d_model, "out_features": projection_dim, "bias": False,
      "activation_function": "torch.nn.modules.linear.Identity"}))
  weight = np.random.default_rng(seed).normal(
      size=(projection_dim, model.config.d_model)).astype(np.float32)
  safetensors.numpy.save_file({"linear.weight": weight},
                              str(directory / "2_Dense" / "model.safetensors"))
  (directory / "3_Normalize").mkdir()
  return weight


def _torch_gtr_embeddings(model, dense_weight, tokens, mask) -> np.ndarray:
  """HF encoder + masked mean pooling + Dense (no bias) + L2 normalise, in torch."""
  with torch.no_grad():
    hidden = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask)).last_hidden_state
    m = torch.as_tensor(mask, dtype=torch.float32)[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    projected = pooled @ torch.as_tensor(dense_weight).T
    return torch.nn.functional.normalize(projected, p=2, dim=1).numpy()


@pytest.mark.parametrize("tower_sharing", TOWER_SHARING_MODES)
def test_gtr_layout_matches_torch(tmp_path, tower_sharing):
  model = _random_hf_t5("gated-gelu", seed=3)
  dense_weight = _write_gtr(tmp_path / "gtr", model, projection_dim=24)
  config, params = hf_import.import_sentence_transformers(tmp_path / "gtr", tower_sharing)
  assert (config.pooling, config.projection_dim, config.normalize,
          config.tower_sharing) == ("mean", 24, True, tower_sharing)
  # Exactly the parameter tree that DualEncoder.init creates.
  tokens, mask = _tokens(3)
  init = jax.eval_shape(DualEncoder(config).init, jax.random.PRNGKey(0), tokens, tokens)
  assert (jax.tree.structure(nn.meta.unbox(init["params"])) == jax.tree.structure(params))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
               nn.meta.unbox(init["params"]), params)

  expected = _torch_gtr_embeddings(model, dense_weight, tokens, mask)
  module = DualEncoder(config)
  queries = module.apply({"params": params}, jnp.asarray(tokens), method=module.encode_queries)
  documents = module.apply({"params": params}, jnp.asarray(tokens),
                           method=module.encode_documents)
  np.testing.assert_allclose(np.asarray(queries), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(documents), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tower_sharing", ["sde", "ade_fte"])
def test_gtr_into_scanned_layers_matches_torch(tmp_path, tower_sharing):
  """With T5Config.scan_layers the import stacks the blocks into the scanned layout."""
  model = _random_hf_t5("gated-gelu", seed=5)
  dense_weight = _write_gtr(tmp_path / "gtr", model, projection_dim=24, seed=5)
  encoder = dataclasses.replace(hf_import.t5_config_from_hf(tmp_path / "gtr" / "0_Transformer"),
                                scan_layers=True)
  config = DualEncoderConfig(encoder=encoder, tower_sharing=tower_sharing, projection_dim=24)
  _, params = hf_import.import_sentence_transformers(tmp_path / "gtr", config=config)
  tokens, mask = _tokens(5)
  init = jax.eval_shape(DualEncoder(config).init, jax.random.PRNGKey(0), tokens, tokens)
  assert jax.tree.structure(nn.meta.unbox(init["params"])) == jax.tree.structure(params)
  tower = params["encoder"] if tower_sharing == "sde" else params["query_encoder"]
  assert tower["layers"]["attention"]["query"]["kernel"].shape == (3, 32, 32)
  expected = _torch_gtr_embeddings(model, dense_weight, tokens, mask)
  module = DualEncoder(config)
  for method in (module.encode_queries, module.encode_documents):
    ours = module.apply({"params": params}, jnp.asarray(tokens), method=method)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-5)


def test_gtr_at_root_with_bin_dense(tmp_path):
  """GTR as published: the T5 encoder at the root (Transformer path ""), Dense as a .bin."""
  model = _random_hf_t5("gated-gelu", seed=4)
  directory = tmp_path / "gtr"
  dense_weight = _write_gtr(directory, model, projection_dim=32, seed=4)
  modules = json.loads((directory / "modules.json").read_text())
  modules[0]["path"] = ""
  (directory / "modules.json").write_text(json.dumps(modules))
  for f in (directory / "0_Transformer").iterdir():
    f.rename(directory / f.name)
  (directory / "2_Dense" / "model.safetensors").unlink()
  torch.save({"linear.weight": torch.as_tensor(dense_weight)},
             directory / "2_Dense" / "pytorch_model.bin")
  config, params = hf_import.import_sentence_transformers(directory)
  tokens, mask = _tokens(4)
  module = DualEncoder(config)
  ours = module.apply({"params": params}, jnp.asarray(tokens), method=module.encode_queries)
  np.testing.assert_allclose(np.asarray(ours), _torch_gtr_embeddings(model, dense_weight, tokens,
                                                                     mask), rtol=1e-4, atol=1e-5)


def test_t5_config_from_hf_defaults_and_errors(tmp_path):
  # Original T5 configs (e.g. t5-base) omit feed_forward_proj: HF's default is "relu".
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072,
      "num_layers": 12, "num_heads": 12}))
  config = hf_import.t5_config_from_hf(tmp_path / "config.json")
  assert config == T5Config(d_model=768, d_ff=3072, feed_forward_proj="relu")
  (tmp_path / "config.json").write_text(json.dumps({"feed_forward_proj": "gated-silu"}))
  with pytest.raises(ValueError, match=r"config.json: feed_forward_proj='gated-silu'"):
    hf_import.t5_config_from_hf(tmp_path)


def test_missing_tensor_is_named(tmp_path):
  model = _random_hf_t5("gated-gelu")
  model.save_pretrained(tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  del tensors["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(KeyError, match=r"model.safetensors: tensor "
                     r"encoder\.block\.2\.layer\.1\.DenseReluDense\.wi_1\.weight is missing "
                     r"but T5Config\(.*d_model=32"):
    hf_import.import_t5_encoder(tmp_path)


def test_wrong_shape_is_named(tmp_path):
  model = _random_hf_t5("gated-gelu")
  model.save_pretrained(tmp_path)
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  name = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
  tensors[name] = tensors[name][:40]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=(
      r"model.safetensors: tensor encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight has "
      r"shape \(40, 32\) but T5Config\(.*d_model=32.*d_ff=48.*\) expects \(48, 32\)")):
    hf_import.import_t5_encoder(tmp_path)


def test_config_mismatch_and_bad_dense(tmp_path):
  model = _random_hf_t5("relu")
  _write_gtr(tmp_path, model, projection_dim=16)
  # Weights cannot reveal max_distance: a config that disagrees with config.json is refused.
  wrong = DualEncoderConfig(
      encoder=T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                       feed_forward_proj="relu", relative_attention_num_buckets=16,
                       relative_attention_max_distance=128),
      projection_dim=16)
  with pytest.raises(ValueError, match=r"relative_attention_max_distance=12 but the given"):
    hf_import.import_sentence_transformers(tmp_path, config=wrong)
  dense_config = tmp_path / "2_Dense" / "config.json"
  raw = json.loads(dense_config.read_text())
  dense_config.write_text(json.dumps({**raw, "bias": True}))
  with pytest.raises(ValueError, match=r"2_Dense/config.json: bias=true is not supported"):
    hf_import.import_sentence_transformers(tmp_path)


def test_t5_checkpoint_into_dual_encoder_with_fresh_projection(tmp_path):
  """Starting a dual encoder from a T5 1.1 checkpoint: encoder imported, projections from init."""
  model = _random_hf_t5("gated-gelu", seed=5)
  model.save_pretrained(tmp_path)
  t5_config, encoder_params = hf_import.import_t5_encoder(tmp_path)
  config = DualEncoderConfig(encoder=t5_config, tower_sharing="ade", projection_dim=8,
                             normalize=False)
  tokens, mask = _tokens(5)
  module = DualEncoder(config)
  init = nn.meta.unbox(module.init(jax.random.PRNGKey(0), tokens, tokens)["params"])
  params = {**init, **hf_import.dual_encoder_params(config, encoder_params)}
  assert jax.tree.structure(params) == jax.tree.structure(init)
  ours = module.apply({"params": params}, jnp.asarray(tokens), method=module.encode_documents)
  hidden = _hf_hidden(model, tokens, mask)
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  expected = pooled @ np.asarray(init["document_projection"]["kernel"])
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-5)


def test_more_blocks_than_config_is_refused(tmp_path):
  _random_hf_t5("relu").save_pretrained(tmp_path)
  config = dataclasses.replace(hf_import.t5_config_from_hf(tmp_path), num_layers=2)
  raw = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**raw, "num_layers": 2}))
  with pytest.raises(ValueError, match=r"model.safetensors: holds more than 2 encoder blocks"):
    hf_import.import_t5_encoder(tmp_path, config)


def test_remote_checkpoint_path_is_refused_with_what_to_do():
  # pathlib would turn gs://b/x into the local path gs:/b/x; the importer must say so instead.
  for call in (lambda: hf_import.import_t5_encoder("gs://bucket/t5-base"),
               lambda: hf_import.import_sentence_transformers("gs://bucket/gtr-t5-base"),
               lambda: hf_import.t5_config_from_hf("gs://bucket/t5-base/config.json")):
    with pytest.raises(ValueError, match=r"gs://bucket/.*local directories only.*gsutil -m cp -r"):
      call()


@pytest.mark.parametrize("damage", ["truncated", "header_longer_than_file", "header_not_json",
                                    "offsets_past_end"])
def test_damaged_safetensors_is_refused_naming_the_file(tmp_path, damage):
  _save(_random_hf_t5("relu"), tmp_path, "safetensors")
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  (header_size,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + header_size])
  if damage == "truncated":
    data = data[:-16]
  elif damage == "header_longer_than_file":
    data = struct.pack("<Q", len(data) * 2) + data[8:]
  elif damage == "header_not_json":
    data = data[:8] + b"{" * header_size + data[8 + header_size:]
  else:  # a tensor's data_offsets point past the end of the file (a lying header)
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**6]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + data[8 + header_size:]
  path.write_bytes(data)
  with pytest.raises(ValueError, match=r"model.safetensors: not a valid safetensors file .*"
                     r"truncated or corrupt"):
    hf_import.import_t5_encoder(tmp_path)
