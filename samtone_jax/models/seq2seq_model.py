"""The encoder-decoder as the trainer sees a model (the idea of T5X's `BaseModel`).

`EncoderDecoderModel` bundles what a generic trainer / evaluator needs and nothing else:
  batch_spec(B, lengths)        the global batch's shapes (for `build` and the AOT compile);
  init_variables(rng)           boxed variables (logical axis names) for `partitioning.sharded_init`
                                / `jax.eval_shape`;
  trainable_mask(params)        every parameter is trained;
  loss_and_metrics(params, batch, dropout_rng)
                                `losses.seq2seq_loss` of the teacher-forced logits: (loss, metric
                                sums and counts, with "loss_sum" / "num_examples");
  score_batch(params, batch)    [b] log-likelihood of each target sequence;
  predict_batch(params, batch, max_length, beam_size)
                                greedy (beam_size 1) or beam-search decodes.

Batches use seqio's `EncDecFeatureConverter` names: "encoder_input_tokens" [B, Li] and
"decoder_target_tokens" [B, Lt] (0 = padding), optionally "decoder_input_tokens" (default: the
targets shifted right) and "decoder_loss_weights" (default: targets > 0). Packed examples (segment
ids / positions) are not supported.

The dual encoder's equivalent is spread over train_step.py today (`_model_initializer`,
`dual_encoder.trainable_mask`, `loss_and_metrics`, `batch_spec`); giving it the same five methods
lets one `build` serve both (see the note at the end of this module).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from samtone_jax import losses
from samtone_jax.models import decoding
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models.config import EncoderDecoderConfig

Array = jax.Array
PyTree = Any

# seqio.EncDecFeatureConverter's model feature names.
ENCODER_INPUT_TOKENS = "encoder_input_tokens"
DECODER_INPUT_TOKENS = "decoder_input_tokens"
DECODER_TARGET_TOKENS = "decoder_target_tokens"
DECODER_LOSS_WEIGHTS = "decoder_loss_weights"


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  """A T5 encoder-decoder with its loss, for the trainer, evaluation and `predict`.

  Attributes:
    config: the architecture.
    loss_config: the token cross-entropy's normalisation, z-loss and label smoothing.
  """

  config: EncoderDecoderConfig
  loss_config: losses.Seq2SeqLossConfig = losses.Seq2SeqLossConfig()

  @property
  def module(self) -> ed.EncoderDecoder:
    return ed.EncoderDecoder(self.config)

  def batch_spec(self, global_batch_size: int, task_feature_lengths: dict[str, int]
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a training batch; task_feature_lengths {"inputs": Li, "targets": Lt}."""
    inputs, targets = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    tokens = lambda length: jax.ShapeDtypeStruct((global_batch_size, length), jnp.int32)
    return {ENCODER_INPUT_TOKENS: tokens(inputs), DECODER_INPUT_TOKENS: tokens(targets),
            DECODER_TARGET_TOKENS: tokens(targets),
            DECODER_LOSS_WEIGHTS: tokens(targets)}  # int32 0/1, as seqio writes them

  def init_variables(self, rng: Array) -> PyTree:
    """rng [2] -> boxed variables. Parameter shapes do not depend on sequence lengths (relative
    positions are bucketed), so [1, 8] dummy inputs suffice."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    return self.module.init({"params": rng, "dropout": rng}, dummy, dummy)

  def trainable_mask(self, params: PyTree) -> PyTree:
    """Every parameter is trained (a pytree of True like `params`)."""
    return jax.tree.map(lambda _: True, params)

  def _decoder_inputs(self, batch: dict[str, Array]) -> Array:
    if DECODER_INPUT_TOKENS in batch:
      return batch[DECODER_INPUT_TOKENS]
    return ed.shift_right(batch[DECODER_TARGET_TOKENS])

  def loss_and_metrics(self, params: PyTree, batch: dict[str, Array],
                       dropout_rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The normalised token cross-entropy of a global batch and its metric sums.

    Args:
      params: the `EncoderDecoder` params.
      batch: global arrays (see the module docstring).
      dropout_rng: key for dropout; None runs the model deterministically.

    Returns:
      (loss [], metrics) as in `losses.seq2seq_loss`.
    """
    logits = self.module.apply(
        {"params": params}, batch[ENCODER_INPUT_TOKENS], self._decoder_inputs(batch),
        deterministic=dropout_rng is None,
        rngs={} if dropout_rng is None else {"dropout": dropout_rng})
    cfg = self.loss_config
    return losses.seq2seq_loss(logits, batch[DECODER_TARGET_TOKENS],
                               batch.get(DECODER_LOSS_WEIGHTS),
                               loss_normalizing_factor=cfg.loss_normalizing_factor,
                               z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)

  def score_batch(self, params: PyTree, batch: dict[str, Array]) -> Array:
    """float32 [b]: sum over each sequence's weighted target tokens of log p(token) (T5X's
    `score_batch`), e.g. to rank candidate answers."""
    logits = self.module.apply({"params": params}, batch[ENCODER_INPUT_TOKENS],
                               self._decoder_inputs(batch))
    targets = batch[DECODER_TARGET_TOKENS]
    weights = batch.get(DECODER_LOSS_WEIGHTS)
    weights = (targets > 0) if weights is None else weights
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * weights, axis=-1)

  def predict_batch(self, params: PyTree, batch: dict[str, Array], max_length: int,
                    beam_size: int = 1, length_penalty_alpha: float = 0.6
                    ) -> tuple[Array, Array]:
    """Decodes `batch[ENCODER_INPUT_TOKENS]`.

    Returns:
      (tokens int32 [b, max_length], 0 after EOS; scores float32 [b]): greedy with beam_size 1,
      otherwise beam search's best sequence and its length-penalised score.
    """
    inputs = batch[ENCODER_INPUT_TOKENS]
    if beam_size == 1:
      return decoding.greedy_decode(self.config, params, inputs, max_length)
    sequences, scores = decoding.beam_search(self.config, params, inputs, max_length, beam_size,
                                             length_penalty_alpha)
    return sequences[:, 0], scores[:, 0]


# What the trainer needs to accept this model (for the lead's integration; train_step.py and
# trainer.py are unchanged here):
#  * `train_step.build` takes a model object with the methods above instead of a
#    DualEncoderConfig: `init_variables` replaces `_model_initializer`, `trainable_mask` replaces
#    `dual_encoder.trainable_mask(config, ...)`, `batch_spec` replaces `batch_spec`'s
#    queries/passages layout, and `loss_and_metrics(params["model"], batch, dropout_rng)` is the
#    loss inside `train_step` (params["loss"] stays {} for this model).
#  * `train_step` adds "temperature" to the metrics and `ChunkConfig.check` reads
#    batch["queries"]: both are dual-encoder-only and move behind the dual encoder's interface
#    (gradient caching stays a dual-encoder option).
#  * The trainer's input pipeline yields seqio EncDecFeatureConverter batches for this model
#    (task_feature_lengths {"inputs", "targets"}); `as_global_batch` and the data sharding are
#    unchanged (every feature has a leading batch axis).
#  * Evaluation: `predict_batch` + exact match (i18data's metric) replaces retrieval metrics; the
#    eval hook dispatches on the model kind. Checkpoints, resume, SIGTERM and metrics logging need
#    no change (the state is still TrainState with params {"model": ..., "loss": {}}).
