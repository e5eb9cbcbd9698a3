"""`EncoderDecoderModel`: its loss equals Hugging Face's `T5ForConditionalGeneration` loss and its
scores HF's log-likelihoods for the same weights; on a (4, 2) mesh its sharded initialisation,
loss and gradients equal one device's."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch

from samtone_jax import losses
from samtone_jax import partitioning
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import hf_import
from samtone_jax.models import seq2seq_model
from samtone_jax.models.config import EncoderDecoderConfig, T5Config

from test_encoder_decoder import padded_batch, random_hf_t5, save  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.usefixtures("fast_compile")


def _hf_setup(tmp_path):
  model = random_hf_t5("gated-gelu", tied=False, seed=5)
  save(model, tmp_path)
  config, params = hf_import.import_t5_encoder_decoder(tmp_path)
  inputs, targets = padded_batch(2)
  batch = {seq2seq_model.ENCODER_INPUT_TOKENS: jnp.asarray(inputs),
           seq2seq_model.DECODER_TARGET_TOKENS: jnp.asarray(targets)}
  with torch.no_grad():
    labels = torch.as_tensor(np.where(targets == 0, -100, targets), dtype=torch.long)
    out = model(input_ids=torch.as_tensor(inputs, dtype=torch.long),
                attention_mask=torch.as_tensor((inputs != 0).astype(np.int64)),
                decoder_input_ids=torch.as_tensor(np.array(ed.shift_right(targets)),
                                                  dtype=torch.long),
                labels=labels)
  return config, params, batch, out, targets


def test_loss_equals_hf_loss(tmp_path):
  config, params, batch, out, _ = _hf_setup(tmp_path)
  model = seq2seq_model.EncoderDecoderModel(config, losses.Seq2SeqLossConfig(
      loss_normalizing_factor="num_real_target_tokens", z_loss=0.0))
  loss, metrics = model.loss_and_metrics(params, batch)
  # HF: mean cross-entropy over the labels that are not -100 (the real target tokens).
  np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)
  assert metrics["num_tokens"] == (np.asarray(batch["decoder_target_tokens"]) > 0).sum()


def test_scores_equal_hf_log_likelihoods(tmp_path):
  config, params, batch, out, targets = _hf_setup(tmp_path)
  model = seq2seq_model.EncoderDecoderModel(config)
  log_probs = torch.log_softmax(out.logits.double(), dim=-1).numpy()
  picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  expected = (picked * (targets > 0)).sum(axis=-1)
  np.testing.assert_allclose(model.score_batch(params, batch), expected, rtol=1e-5)


def test_sharded_4x2_mesh_equals_one_device():
  config = EncoderDecoderConfig(t5=T5Config(
      vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1))
  model = seq2seq_model.EncoderDecoderModel(config, losses.Seq2SeqLossConfig(z_loss=1e-3))
  inputs, targets = padded_batch(4)
  inputs, targets = np.concatenate([inputs] * 3)[:8] % 64, np.concatenate([targets] * 3)[:8]
  batch = {seq2seq_model.ENCODER_INPUT_TOKENS: inputs,
           seq2seq_model.DECODER_TARGET_TOKENS: targets}
  rng = jax.random.PRNGKey(0)

  def loss_fn(params, batch):
    return model.loss_and_metrics(params, batch, dropout_rng=jax.random.PRNGKey(1))

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                 partitioning.MESH_AXES)
  results = []
  for mesh in (one_device, partitioning.create_mesh(4, 2)):
    params, shardings = partitioning.sharded_init(model.init_variables, mesh, rng)
    params = params["params"]
    sharded_batch = {k: jax.device_put(v, partitioning.data_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
    with partitioning.mesh_context(mesh):
      results.append(grad_fn(params, sharded_batch))
    if mesh.shape["model"] == 2:
      # The vocabulary and the heads are split over the model axis.
      assert shardings["params"]["token_embedder"]["embedding"].spec == P("model", None)
      assert shardings["params"]["decoder"]["logits_dense"]["kernel"].spec == P(None, "model")
      assert params["decoder"]["layers_0"]["encoder_decoder_attention"]["query"][
          "kernel"].sharding.spec == P(None, "model")
  ((loss, metrics), grads), ((s_loss, s_metrics), s_grads) = results
  np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(s_metrics[k], metrics[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_grads,
               grads)
