"""The one place that tells the model kinds apart: dual encoder or encoder-decoder (SKILL).

The trainer and `train_step.build` take either a `config.DualEncoderConfig` or a
`seq2seq_model.EncoderDecoderModel` as their model; `is_seq2seq` decides which, and `of(model)`
gives the trainer what differs between them: the feature lengths the run binds, the vocabulary
size the task must fit, the batch layout, which eval sets are valid and how they are evaluated.
Everything else (build's `Built`, `TrainState`, checkpoints, resume, SIGTERM, metrics) is shared.
"""

import dataclasses
from typing import Any, Sequence

from samtone_jax.models import seq2seq_model

PyTree = Any


def is_seq2seq(model: Any) -> bool:
  """Whether `model` is the encoder-decoder (otherwise a DualEncoderConfig)."""
  return isinstance(model, seq2seq_model.EncoderDecoderModel)


@dataclasses.dataclass(frozen=True)
class DualEncoderKind:
  """The dual encoder as the trainer sees it (TASK_FEATURE_LENGTHS {"queries", "passages"})."""

  model: Any  # config.DualEncoderConfig
  feature_keys: tuple[str, ...] = ("queries", "passages")

  @property
  def vocab_size(self) -> int:
    return self.model.encoder.vocab_size

  def batch_spec(self, batch_size: int, task_feature_lengths, num_negatives: int = 0) -> dict:
    """The step's global batch layout; `num_negatives`: hard negatives per query
    (`trainer.num_negatives`: the task's when the loss uses them, else 0)."""
    from samtone_jax import train_step  # pylint: disable=g-import-not-at-top
    return train_step.batch_spec(batch_size, task_feature_lengths, num_negatives=num_negatives)

  def check_eval_sets(self, eval_sets: Sequence[str]) -> None:
    from samtone_jax.tasks import eval_sets as eval_sets_lib  # pylint: disable=g-import-not-at-top
    eval_sets_lib.check_registered(eval_sets)

  def evaluate(self, built, params: PyTree, mesh, data, loop, output_dir: str,
               eval_set_cache: dict[str, Any] | None = None) -> dict[str, float]:
    """Retrieval metrics of LoopConfig.eval_sets; `eval_set_cache` keeps the parsed eval sets
    between the evaluations of one run."""
    from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    return runner.evaluate_params(
        built.model, params, mesh, loop.eval_sets, output_dir=output_dir,
        metrics=list(loop.eval_metrics) or None, feature_lengths=loop.eval_feature_lengths,
        ignore_identical_ids=loop.eval_ignore_identical_ids,
        embeddings_dir=loop.eval_embeddings_dir, embedding_dtype=loop.eval_embedding_dtype,
        eval_set_cache=eval_set_cache)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderKind:
  """The encoder-decoder (TASK_FEATURE_LENGTHS {"inputs", "targets"}); evaluated by greedy
  decoding + exact match on closed-book QA eval sets ("TASK[:SPLIT]")."""

  model: seq2seq_model.EncoderDecoderModel
  feature_keys: tuple[str, ...] = ("inputs", "targets")

  @property
  def vocab_size(self) -> int:
    return self.model.config.t5.vocab_size

  def batch_spec(self, batch_size: int, task_feature_lengths, num_negatives: int = 0) -> dict:
    del num_negatives  # a dual-encoder feature
    return self.model.batch_spec(batch_size, task_feature_lengths)

  def check_eval_sets(self, eval_sets: Sequence[str]) -> None:
    from samtone_jax.evaluation import closed_book_qa  # pylint: disable=g-import-not-at-top
    closed_book_qa.check_eval_sets(eval_sets)

  def evaluate(self, built, params: PyTree, mesh, data, loop, output_dir: str,
               eval_set_cache: dict[str, Any] | None = None) -> dict[str, float]:
    """Exact match on each eval set; questions and answers are truncated to the eval feature
    lengths (LoopConfig.eval_feature_lengths, default TASK_FEATURE_LENGTHS)."""
    from samtone_jax.evaluation import closed_book_qa  # pylint: disable=g-import-not-at-top
    lengths = dict(loop.eval_feature_lengths or data.task_feature_lengths)
    return closed_book_qa.evaluate_params(
        self.model, params["model"], mesh, loop.eval_sets, input_length=lengths["inputs"],
        max_decode_length=lengths["targets"], output_dir=output_dir)


def of(model: Any) -> DualEncoderKind | EncoderDecoderKind:
  """The trainer's view of `model`'s kind."""
  return EncoderDecoderKind(model) if is_seq2seq(model) else DualEncoderKind(model)
