"""seqio output features and preprocessors shared by every dual-encoder task.

A task's source yields raw text examples {"queries": str, "passages": str} and, for tasks with
hard negatives, {"negatives": [N] str}. The preprocessors tokenise them with the task's
SentencePiece vocabulary and apply T5's EOS convention: each sequence is cut to `length - 1`
tokens and EOS (id 1) appended, so a truncated sequence still ends in EOS (seqio's
`append_eos_after_trim`, extended to the rank-2 "negatives", which use the passages length).
Every preprocessor maps one example to one example; `pipeline.get_train_iterator` relies on that
to resume a stream by skipping raw examples.
"""

from collections.abc import Mapping

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
    return tf.concat([tokens, tf.RaggedTensor.from_tensor(eos)], axis=1)
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
