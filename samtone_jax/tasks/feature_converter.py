"""Dual-encoder feature converter: task features -> the model batch described in `features.py`.

It pads queries, passages and hard negatives to their lengths (no packing: each row is one
text, encoded by one tower) and adds "query_ids"/"passage_ids", fingerprints of the token
sequences, so the contrastive loss can tell a repeated question or a shared answer from a true
negative. The fingerprint is a polynomial hash of the padded token ids modulo the prime 2^31 - 1,
written so it can be recomputed in numpy:

  id = (sum_i tokens[i] * P^i mod M) mod M,   P = 1_000_003, M = 2^31 - 1,

equal token sequences give equal ids; distinct sequences collide with probability ~1/M.
"""

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import features

FINGERPRINT_MODULUS = 2**31 - 1
FINGERPRINT_BASE = 1_000_003


def _fingerprint_powers(length: int) -> np.ndarray:
  powers = np.ones(length, np.int64)
  for i in range(1, length):
    powers[i] = powers[i - 1] * FINGERPRINT_BASE % FINGERPRINT_MODULUS
  return powers


def fingerprint_tokens(tokens: tf.Tensor) -> tf.Tensor:
  """tokens: int32 [L] padded token ids -> int32 [] fingerprint in [0, 2^31 - 1)."""
  powers = tf.constant(_fingerprint_powers(int(tokens.shape[-1])))
  terms = tf.math.floormod(tf.cast(tokens, tf.int64) * powers, FINGERPRINT_MODULUS)
  return tf.cast(tf.math.floormod(tf.reduce_sum(terms, axis=-1), FINGERPRINT_MODULUS), tf.int32)


def _pad(tokens: tf.Tensor, length: int) -> tf.Tensor:
  """tokens: [<=L] -> [L], zero padded (longer inputs are cut; task trimming keeps EOS)."""
  tokens = tokens[:length]
  padded = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]], constant_values=features.PAD_ID)
  return tf.ensure_shape(padded, [length])


def _pad_rows(tokens: tf.Tensor | tf.RaggedTensor, length: int) -> tf.Tensor:
  """tokens: [N, <=L] (ragged or dense) -> [N, L], zero padded."""
  if not isinstance(tokens, tf.RaggedTensor):
    tokens = tf.RaggedTensor.from_tensor(tokens)
  return tokens.to_tensor(default_value=features.PAD_ID, shape=[None, length])


class DualEncoderFeatureConverter(seqio.FeatureConverter):
  """Converts dual-encoder task features to padded model features; never packs.

  Task features (lengths keyed "queries" and "passages"; negatives use the passages length):
    queries:   int32 [<=Lq]      EOS-terminated token ids.
    passages:  int32 [<=Lp]
    negatives: int32 [N, <=Lp]   (ragged) only with `with_negatives=True`.
  Model features, per example (batched by the caller):
    queries [Lq], passages [Lp], negatives [N, Lp], query_ids [], passage_ids [] (int32).
  """

  TASK_FEATURES = {
      features.QUERIES: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      features.PASSAGES: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      features.QUERIES: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      features.PASSAGES: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      features.QUERY_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
      features.PASSAGE_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, with_negatives: bool = False, pack: bool = False, **kwargs):
    if pack:
      raise ValueError("DualEncoderFeatureConverter does not pack: each row is one text.")
    super().__init__(pack=False, **kwargs)
    self._with_negatives = with_negatives
    if with_negatives:
      self.MODEL_FEATURES = dict(self.MODEL_FEATURES)
      self.MODEL_FEATURES[features.NEGATIVES] = seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32, rank=2, sequence_dim=1)

  @property
  def with_negatives(self) -> bool:
    return self._with_negatives

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    query_length = task_feature_lengths[features.QUERIES]
    passage_length = task_feature_lengths[features.PASSAGES]
    if self._with_negatives and features.NEGATIVES not in ds.element_spec:
      raise ValueError("with_negatives=True but the task has no 'negatives' feature; "
                       f"it has {sorted(ds.element_spec)}")

    def convert(example):
      queries = _pad(example[features.QUERIES], query_length)
      passages = _pad(example[features.PASSAGES], passage_length)
      result = {
          features.QUERIES: queries,
          features.PASSAGES: passages,
          features.QUERY_IDS: fingerprint_tokens(queries),
          features.PASSAGE_IDS: fingerprint_tokens(passages),
      }
      if self._with_negatives:
        result[features.NEGATIVES] = _pad_rows(example[features.NEGATIVES], passage_length)
      return result

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = {
        features.QUERIES: task_feature_lengths[features.QUERIES],
        features.PASSAGES: task_feature_lengths[features.PASSAGES],
        features.QUERY_IDS: 1,  # rank 0: not length-checked by seqio
        features.PASSAGE_IDS: 1,
    }
    if self._with_negatives:
      lengths[features.NEGATIVES] = task_feature_lengths[features.PASSAGES]
    return lengths
