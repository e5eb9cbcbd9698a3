"""seqio output features and preprocessors shared by every dual-encoder task.

A task's source yields raw text examples {"queries": str, "passages": str} and, for tasks with
hard negatives, {"negatives": [N] str}. The preprocessors tokenise them with the task's
SentencePiece vocabulary and apply T5's EOS convention: each sequence is cut to `length - 1`
tokens and EOS (id 1) appended, so a truncated sequence still ends in EOS (seqio's
`append_eos_after_trim`, extended to the rank-2 "negatives", which use the passages length).
Every preprocessor maps one example to one example; `pipeline.get_train_iterator` relies on that
to resume a stream by skipping raw examples.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from samtone_jax.tasks import features


def output_features(vocabulary: seqio.Vocabulary, *, with_negatives: bool = False
                    ) -> dict[str, seqio.Feature]:
  """The task output features: token ids of queries, passages and optionally negatives."""
  result = {
      features.QUERIES: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=1),
      features.PASSAGES: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=1),
  }
  if with_negatives:
    result[features.NEGATIVES] = seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=2)
  return result


def seq2seq_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """The output features of a seq2seq task (SKILL, closed-book QA): "inputs" and "targets" token
  ids, both EOS-terminated (T5's convention)."""
  return {key: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=1)
          for key in (features.INPUTS, features.TARGETS)}


def feature_length(sequence_length: Mapping[str, int] | None, key: str) -> int | None:
  """Length of `key`; negatives use the passages length unless given their own."""
  if not sequence_length:
    return None
  if key == features.NEGATIVES and key not in sequence_length:
    key = features.PASSAGES
  return sequence_length.get(key)


def _trim_and_append_eos(tokens: tf.Tensor | tf.RaggedTensor, length: int | None, eos_id: int
                         ) -> tf.Tensor | tf.RaggedTensor:
  """tokens: [L] or ragged [N, None]; returns the last axis cut to length-1, then EOS."""
  if length is not None:
    tokens = tokens[..., :length - 1]
  if isinstance(tokens, tf.RaggedTensor):
    eos = tf.fill([tokens.nrows(), 1], tf.constant(eos_id, tokens.dtype))
    # (row_splits dtype of the input: seqio's cache reader parses ragged features with int32.)
    return tf.concat([tokens, tf.RaggedTensor.from_tensor(
        eos, row_splits_dtype=tokens.row_splits.dtype)], axis=1)
  return tf.concat([tokens, tf.constant([eos_id], tokens.dtype)], axis=0)


# Parallel calls keep the order (tf.data is deterministic by default) and let tokenisation, the
# pipeline's most expensive op, use every core.
@seqio.map_over_dataset(num_parallel_calls=tf.data.AUTOTUNE)
def _tokenize_trim_append_eos(example, output_features, sequence_length):
  result = {}
  for key, value in example.items():
    if key in output_features:
      feature = output_features[key]
      value = tf.cast(feature.vocabulary.encode_tf(value), feature.dtype)
      if feature.add_eos:
        value = _trim_and_append_eos(value, feature_length(sequence_length, key),
                                     feature.vocabulary.eos_id)
    result[key] = value
  return result


# The same two steps as `_tokenize_trim_append_eos`, split at seqio's cache point: the token ids
# are cached (untrimmed, no EOS) and each run trims them to its own lengths, so a cache serves
# every TASK_FEATURE_LENGTHS and a cached task yields the ids of the uncached one.
@seqio.map_over_dataset(num_parallel_calls=tf.data.AUTOTUNE)
def tokenize(example, output_features):
  """Pre-cache step: texts -> int32 token ids ([L] or ragged [N, L]); no trimming, no EOS."""
  return {key: tf.cast(output_features[key].vocabulary.encode_tf(value),
                       output_features[key].dtype) if key in output_features else value
          for key, value in example.items()}


@seqio.map_over_dataset(num_parallel_calls=tf.data.AUTOTUNE)
def trim_append_eos(example, output_features, sequence_length):
  """Post-cache step: cuts each feature to its length - 1 and appends EOS (see module doc)."""
  result = {}
  for key, value in example.items():
    feature = output_features.get(key)
    if feature is not None and feature.add_eos:
      if isinstance(value, tf.Tensor) and value.shape.rank == 2:  # negatives parsed dense
        value = tf.RaggedTensor.from_tensor(value)
      value = _trim_and_append_eos(value, feature_length(sequence_length, key),
                                   feature.vocabulary.eos_id)
    result[key] = value
  return result


def tokenize_texts(texts: Sequence[str], vocabulary: seqio.Vocabulary, length: int) -> np.ndarray:
  """Token ids of `texts` exactly as a training batch holds them: trim, EOS, zero padding.

  The evaluation and encoding path call this so that a text gets the same ids at training and at
  test time: the same `encode_tf` op, the same `_trim_and_append_eos`, the same padding id as
  `DualEncoderFeatureConverter`.

  Args:
    texts: n strings.
    vocabulary: the task's seqio vocabulary.
    length: L >= 1, EOS included.

  Returns:
    int32 [n, L]: ids cut to L - 1, then EOS, then `features.PAD_ID`.
  """
  if length < 1:
    raise ValueError(f"length={length} must be >= 1 (room for EOS).")
  if not texts:
    return np.zeros((0, length), np.int32)
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    # The batched op gives each string the ids the per-example op gives it, much faster.
    ragged = vocabulary.encode_tf(tf.constant(list(texts), dtype=tf.string))
  else:  # e.g. ByteVocabulary's encode_tf takes one string at a time, as the pipeline calls it
    ragged = tf.ragged.constant(
        [vocabulary.encode_tf(tf.constant(text)).numpy().tolist() for text in texts],
        dtype=tf.int32, ragged_rank=1)
  ragged = _trim_and_append_eos(tf.cast(ragged, tf.int32), length, vocabulary.eos_id)
  return ragged.to_tensor(default_value=features.PAD_ID, shape=[len(texts), length]).numpy()


def tokenize_trim_append_eos(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                             sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
  """Tokenises the output features, trims each to its length - 1 and appends EOS.

  Args:
    dataset: examples {"queries": str, "passages": str, ["negatives": [N] str], ...}.
    output_features: the task's features (vocabulary, add_eos).
    sequence_length: {"queries": Lq, "passages": Lp} (negatives use Lp); None: no trimming.

  Returns:
    the dataset with "queries" int32 [<=Lq], "passages" int32 [<=Lp], "negatives" int32 ragged
    [N, <=Lp]; other features pass through.
  """
  return _tokenize_trim_append_eos(dataset, output_features=output_features,
                                   sequence_length=sequence_length)
