"""The one place that tells the model kinds apart: dual encoder or encoder-decoder (SKILL).

The trainer and `train_step.build` take either a `config.DualEncoderConfig` or a
`seq2seq_model.EncoderDecoderModel` as their model; `is_seq2seq` decides which, and `of(model)`
gives the trainer what differs between them: the feature lengths the run binds, the vocabulary
size the task must fit, the batch layout, which eval sets are valid and how they are evaluated.
Everything else (build's `Built`, `TrainState`, checkpoints, resume, SIGTERM, metrics) is shared.

`of(model).check_options(loss, chunks, loop)` refuses the bindings a kind would ignore (the
contrastive loss, gradient caching and the retrieval-eval options on an encoder-decoder run), and
`check_architecture_bindings` the dual-encoder architecture files (called by the gin boundary), so
a run never trains something other than what its gin files say.
"""

import dataclasses
from typing import Any, Sequence

from samtone_jax import losses
from samtone_jax.models import seq2seq_model

PyTree = Any

# The dual encoder's options an encoder-decoder run would ignore: (field, gin macro, default). ChunkConfig and LoopConfig are read by field name (importing train_step or
# trainer here would be circular).
_CHUNK_OPTIONS = (("embedding_chunk_size", "EMBEDDING_CHUNK_SIZE", 0),
                  ("loss_chunk_size", "LOSS_CHUNK_SIZE", 0))
# DualEncoderConfig fields an architecture file binds (gin/architectures/*.gin: tower sharing,
# ADE-FTE's frozen token embedder) that an encoder-decoder run would ignore. Its `encoder` and
# `projection_dim` are bound by every gin/models/*.gin (sizes shared by both kinds), so not these.
DUAL_ENCODER_ARCHITECTURE_FIELDS = ("tower_sharing", "pooling", "normalize")
_RETRIEVAL_EVAL_OPTIONS = (("eval_metrics", "EVAL_METRICS", ()),
                           ("eval_ignore_identical_ids", "EVAL_IGNORE_IDENTICAL_IDS", None),
                           ("eval_embeddings_dir", "EVAL_EMBEDDINGS_DIR", None),
                           ("eval_embedding_dtype", "EVAL_EMBEDDING_DTYPE", "float32"))


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

  def check_options(self, loss: losses.LossConfig | None = None, chunks: Any = None,
                    loop: Any = None) -> None:
    """Every option applies to the dual encoder: nothing to refuse."""
    del loss, chunks, loop

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

  def check_options(self, loss: losses.LossConfig | None = None, chunks: Any = None,
                    loop: Any = None) -> None:
    """Refuses the dual encoder's options, which this model kind would silently ignore.

    Args:
      loss: `trainer.train.loss`: any field other than `losses.LossConfig()`'s (a loss file,
        hard negatives, a temperature) is refused; the encoder-decoder's loss is
        `losses.Seq2SeqLossConfig`.
      chunks: a `train_step.ChunkConfig`: gradient caching and loss row chunking are refused.
      loop: a `trainer.LoopConfig`: the retrieval-eval options (EVAL_METRICS,
        EVAL_IGNORE_IDENTICAL_IDS, EVAL_EMBEDDINGS_DIR, EVAL_EMBEDDING_DTYPE) are refused; its
        eval is greedy decoding + exact match.

    Raises:
      ValueError: naming every refused binding, its value and what to do.
    """
    problems = []
    if chunks is not None:
      for field, macro, default in _CHUNK_OPTIONS:
        value = getattr(chunks, field)
        if value != default:
          problems.append(
              f"{macro} = {value!r} (train_step.ChunkConfig.{field}): chunking applies to the "
              f"dual encoder's contrastive loss; set {macro}=0 (its default).")
    if loss is not None:
      default_loss = losses.LossConfig()
      for field in dataclasses.fields(losses.LossConfig):
        value = getattr(loss, field.name)
        if value != getattr(default_loss, field.name):
          problems.append(
              f"losses.LossConfig.{field.name} = {value!r}: the contrastive loss (and its hard "
              "negatives) is the dual encoder's; the encoder-decoder trains on "
              "losses.Seq2SeqLossConfig (gin/runs/skill_infuse.gin): drop the loss file or "
              "binding from this run.")
    if loop is not None:
      for field, macro, default in _RETRIEVAL_EVAL_OPTIONS:
        value = getattr(loop, field)
        if isinstance(value, list):
          value = tuple(value)  # EVAL_METRICS = [] in gin is the default ()
        if value != default:
          problems.append(
              f"{macro} = {value!r} (trainer.LoopConfig.{field}): a retrieval-eval option; the "
              "encoder-decoder is evaluated by greedy decoding and exact match on EVAL_TASKS: "
              f"drop the binding ({macro} = {default!r}).")
    if problems:
      raise ValueError("The encoder-decoder (seq2seq_model.EncoderDecoderModel) does not use "
                       "these dual-encoder bindings, so refuses them rather than ignore them:\n  "
                       + "\n  ".join(problems))

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


def check_architecture_bindings(bound: dict[str, Any]) -> None:
  """Refuses dual-encoder architecture bindings on an encoder-decoder run.

  The gin boundary (`gin_config.parse_gin`) calls this when `trainer.train.model` is the
  encoder-decoder, with what the config binds for `config.DualEncoderConfig`: that config is then
  never built, so an architecture file (e.g. architectures/ade_fte.gin, whose token embedder is
  frozen) would be silently ignored.

  Args:
    bound: {DualEncoderConfig field: bound value} (fields not bound are absent).

  Raises:
    ValueError: naming each field of DUAL_ENCODER_ARCHITECTURE_FIELDS bound to a value other
      than its default.
  """
  from samtone_jax.models import config  # pylint: disable=g-import-not-at-top
  default = config.DualEncoderConfig()
  problems = [f"config.DualEncoderConfig.{field} = {bound[field]!r}" for field in
              DUAL_ENCODER_ARCHITECTURE_FIELDS
              if field in bound and bound[field] != getattr(default, field)]
  if problems:
    raise ValueError(
        f"{', '.join(problems)}: a dual-encoder architecture (gin/architectures/*.gin: tower "
        "sharing, frozen parts, pooling) but trainer.train.model is the encoder-decoder "
        "(seq2seq_model.EncoderDecoderModel), which would ignore it: drop the architecture file "
        "or binding from this run (every encoder-decoder parameter is trained).")


def of(model: Any) -> DualEncoderKind | EncoderDecoderKind:
  """The trainer's view of `model`'s kind."""
  return EncoderDecoderKind(model) if is_seq2seq(model) else DualEncoderKind(model)
