"""A trained dual encoder as a TF SavedModel: strings in, embeddings out (as GTR was published).

  model = tf.saved_model.load(EXPORT_DIR)
  model.signatures["encode_queries"](tf.constant(["how do I list files"]))["embeddings"]
  model.signatures["encode_documents"](tf.constant([...]))["embeddings"]   # float32 [n, P]

`serving_default` is `encode_documents`. Every tower sharing mode has both signatures (SDE: the
same tower, each with its own token length). Inside the graph, tf-text's SentencepieceTokenizer
(the training SentencePiece model, as seqio tokenises) cuts each text to L - 1 pieces and
appends EOS, as `evaluation.encoding.tokenize` does; the encoder is the JAX `DualEncoder`
converted with `jax.experimental.jax2tf` (native serialization, lowered for CPU, GPU and TPU),
with a symbolic batch size. Parameters are tf.Variables (the `params` tree), not graph constants,
so models above 2 GB save too. Loading needs TensorFlow and tensorflow-text (for the tokenizer op).

Activations are float32 whatever `T5Config.dtype` the model trained with (as the
sentence-transformers export and GTR's own SavedModels): a bfloat16 graph compiled by TensorFlow's
XLA is not our bfloat16 computation (measured: 7e-3 apart on a tiny model, bfloat16's rounding), so
only float32 gives embeddings that equal our encoder's (float32) to 1e-4.
"""

import dataclasses
import pathlib
from typing import Any

import jax
from jax.experimental import jax2tf
import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from samtone_jax.models.config import DualEncoderConfig
from samtone_jax.models.dual_encoder import DualEncoder
from samtone_jax.tasks.features import EOS_ID, PAD_ID

# Lowered for every platform a published model may be served on.
PLATFORMS = ("cpu", "cuda", "tpu")
SIGNATURES = {"encode_queries": ("queries", DualEncoder.encode_queries),
              "encode_documents": ("passages", DualEncoder.encode_documents)}


def tokenize(tokenizer: tf_text.SentencepieceTokenizer, texts: tf.Tensor, length: int) -> tf.Tensor:
  """string [n] -> int32 [n, length]: pieces cut to length - 1, EOS, then zeros."""
  pieces = tokenizer.tokenize(texts)[:, :length - 1]
  eos = tf.ones_like(pieces[:, :1].to_tensor(default_value=EOS_ID, shape=[None, 1]))
  with_eos = tf.concat([pieces, tf.RaggedTensor.from_tensor(eos)], axis=1)
  return with_eos.to_tensor(default_value=PAD_ID, shape=[None, length])


def float32_activations(config: DualEncoderConfig) -> DualEncoderConfig:
  """`config` with float32 activations (see the module docstring)."""
  return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, dtype="float32"))


class _Encoders(tf.Module):
  """The tokenizer, the params as variables and one tf.function per signature."""

  def __init__(self, config: DualEncoderConfig, params: dict[str, Any],
               sentencepiece_model: bytes, max_seq_lengths: dict[str, int]):
    super().__init__()
    self.tokenizer = tf_text.SentencepieceTokenizer(model=sentencepiece_model, out_type=tf.int32,
                                                    add_bos=False, add_eos=False)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    self.params = tf.nest.map_structure(tf.Variable, host)
    model = DualEncoder(float32_activations(config))
    self.functions = {}
    for name, (feature, method) in SIGNATURES.items():
      self.functions[name] = self._signature(model, method, int(max_seq_lengths[feature]))
      setattr(self, name, self.functions[name])

  def _signature(self, model: DualEncoder, method, length: int) -> Any:
    """strings [n] -> {"embeddings": float32 [n, P]} through one tower, at token length `length`."""
    apply = lambda p, tokens: model.apply({"params": p}, tokens, method=method)
    converted = jax2tf.convert(apply, polymorphic_shapes=[None, f"(b, {length})"],
                               with_gradient=False, native_serialization_platforms=PLATFORMS)

    def encode(texts):
      return {"embeddings": converted(self.params, tokenize(self.tokenizer, texts, length))}

    return tf.function(encode, input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
                       autograph=False)


def write(directory: pathlib.Path, config: DualEncoderConfig, params: dict[str, Any],
          sentencepiece_model: bytes, max_seq_lengths: dict[str, int]) -> None:
  """Writes the SavedModel of a dual encoder into `directory` (see the module docstring).

  Args:
    directory: an empty local directory.
    config: the dual encoder's architecture.
    params: its `params` collection (host or device arrays).
    sentencepiece_model: the serialized SentencePiece model it was trained with.
    max_seq_lengths: {"queries": Lq, "passages": Lp} token lengths (EOS included).
  """
  module = _Encoders(config, params, sentencepiece_model, max_seq_lengths)
  signatures = {name: fn.get_concrete_function() for name, fn in module.functions.items()}
  signatures["serving_default"] = signatures["encode_documents"]
  tf.saved_model.save(module, str(directory), signatures=signatures)


USAGE = """## Usage

```python
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece op

model = tf.saved_model.load("{path}")
queries = model.signatures["encode_queries"](tf.constant(["how do I list files"]))["embeddings"]
documents = model.signatures["encode_documents"](tf.constant(["ls lists directory contents"]))
scores = tf.matmul(queries, documents["embeddings"], transpose_b=True)
```

Strings in, float32 embeddings [n, P] out; tokenisation (the training SentencePiece model, EOS
appended) happens inside the graph. `serving_default` is `encode_documents`.
"""
