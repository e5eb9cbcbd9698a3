"""Our parameters in Hugging Face's T5 layout: the inverse of `models/hf_import.py`.

Tensor mapping only (numpy in, numpy out); writing directories is `samtone_jax.exporting`'s job.

  tower_params(config, params, side)       one tower of a `DualEncoder` tree: (T5Encoder params
                                           with token_embedder, projection kernel [d_model, P]).
  t5_encoder_state_dict(config, encoder)   T5Encoder params -> {HF T5EncoderModel tensor name:
                                           float32 array in torch layout}.
  hf_t5_config(config)                     T5Config -> the config.json dict of a T5EncoderModel.

Our kernels are [in, out]; torch Linear weights are [out, in], so they are transposed.
"""

from typing import Any

import jax
import numpy as np

from samtone_jax.models import dual_encoder
from samtone_jax.models import t5
from samtone_jax.models.config import DualEncoderConfig, T5Config
from samtone_jax.tasks import features


def tower_params(config: DualEncoderConfig, params: dict[str, Any],
                 side: str) -> tuple[dict[str, Any], np.ndarray]:
  """One tower of a `DualEncoder` params tree, as host numpy float32.

  Args:
    config: the dual encoder config.
    params: the `DualEncoder` `params` collection (numpy or jax arrays; scanned or unrolled
      layers).
    side: "query" or "document".

  Returns:
    (encoder_params, projection_kernel): a standalone unrolled `T5Encoder` tree with
    `token_embedder`, and the projection kernel [d_model, projection_dim].
  """
  names = dual_encoder.tower_parameter_names(config.tower_sharing, side)
  host = lambda tree: jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), tree)
  encoder = t5.unstack_layers(host(params[names["encoder"]]))
  encoder["token_embedder"] = host(params[names["token_embedder"]])
  return encoder, host(params[names["projection"]]["kernel"])


def t5_encoder_state_dict(config: T5Config, encoder_params: dict[str, Any]
                          ) -> dict[str, np.ndarray]:
  """A T5Encoder tree in the tensor names and layout of `transformers.T5EncoderModel`.

  Args:
    config: the encoder's config.
    encoder_params: a standalone unrolled `T5Encoder` tree with `token_embedder`.

  Returns:
    {name: float32 array}; `shared.weight` and `encoder.embed_tokens.weight` are both present
    (HF ties them).
  """
  p = t5.unstack_layers(encoder_params)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  linear = lambda kernel: f32(np.asarray(kernel).T)  # [in, out] -> torch [out, in].
  embedding = f32(p["token_embedder"]["embedding"])
  state = {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding,
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
               linear(p["relpos_bias"]["rel_embedding"]),
           "encoder.final_layer_norm.weight": f32(p["encoder_norm"]["scale"])}
  for i in range(config.num_layers):
    layer = p[f"layers_{i}"]
    block = f"encoder.block.{i}.layer"
    state[f"{block}.0.layer_norm.weight"] = f32(layer["pre_attention_layer_norm"]["scale"])
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
      state[f"{block}.0.SelfAttention.{theirs}.weight"] = linear(
          layer["attention"][ours]["kernel"])
    state[f"{block}.1.layer_norm.weight"] = f32(layer["pre_mlp_layer_norm"]["scale"])
    for name, weights in layer["mlp"].items():  # wi (relu) or wi_0 / wi_1 (gated-gelu); wo.
      state[f"{block}.1.DenseReluDense.{name}.weight"] = linear(weights["kernel"])
  return state


def hf_t5_config(config: T5Config) -> dict[str, Any]:
  """The config.json of a `transformers.T5EncoderModel` with `config`'s architecture.

  `t5_config_from_hf` reads it back to an equal architecture. Dropout is recorded as trained.
  """
  return {
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_layers": config.num_layers,
      "num_heads": config.num_heads,
      "feed_forward_proj": config.feed_forward_proj,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "is_encoder_decoder": False,
      "use_cache": False,
      "pad_token_id": features.PAD_ID,
      "eos_token_id": 1,
      "decoder_start_token_id": features.PAD_ID,
  }
