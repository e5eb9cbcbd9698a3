"""Loading a trained dual encoder and running it on evaluation sets: the one home for both.

Every command that reads a checkpoint (`samtone_jax.evaluate`, `samtone_jax.encode`, and the
commands built on them) and the trainer's in-training evaluation go through this module, so a
model is restored, its eval sets are tokenised and its metrics computed one way only.

  loaded = runner.load_model(checkpoint_path, model_config)
  results = runner.evaluate_params(loaded.module, loaded.params, loaded.mesh, ["demo_manpages_test"])
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax

from samtone_jax import checkpoints
from samtone_jax import partitioning
from samtone_jax import train_step as train_step_lib
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import retrieval
from samtone_jax.models import config as model_config_lib
from samtone_jax.models import dual_encoder
from samtone_jax.tasks import eval_sets as eval_sets_lib
from samtone_jax.tasks import vocab

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A dual encoder restored from a checkpoint.

  Attributes:
    module: the DualEncoder.
    params: {"model": DualEncoder params}, sharded on `mesh`.
    mesh: the (data, model) mesh the params live on.
  """

  module: dual_encoder.DualEncoder
  params: PyTree
  mesh: jax.sharding.Mesh

  def encode_fns(self) -> tuple[encoding.EncodeFn, encoding.EncodeFn]:
    """(encode_queries, encode_documents): token ids [n, L] -> embeddings, on the mesh."""
    return encoding.dual_encoder_encode_fns(self.module, self.params["model"], self.mesh)


def load_model(checkpoint_path: str, model: model_config_lib.DualEncoderConfig,
               mesh_shape: tuple[int, int] = (-1, 1)) -> LoadedModel:
  """Restores the DualEncoder params of `checkpoint_path`, sharded on a new mesh.

  Args:
    checkpoint_path: a run directory (its latest checkpoint), its checkpoints/ directory, or one
      checkpoints/<step> directory.
    model: the architecture the checkpoint was trained with.
    mesh_shape: (data, model) mesh sizes; -1 fills.
  """
  mesh = partitioning.create_mesh(*mesh_shape)
  abstract = {"model": train_step_lib.abstract_model_params_of(model, mesh)}
  params = checkpoints.restore_params(checkpoint_path, abstract)
  return LoadedModel(dual_encoder.DualEncoder(model), params, mesh)


def get_eval_set(name: str, feature_lengths: dict[str, int] | None = None,
                 model_vocab_size: int | None = None) -> eval_sets_lib.EvalSet:
  """The registered evaluation set `name`, tokenised to `feature_lengths` when given.

  Args:
    name: a registered evaluation set.
    feature_lengths: {"queries": Lq, "passages": Lp} (EVAL_FEATURE_LENGTHS / the training
      lengths) to use instead of the set's own; None: the set's lengths.
    model_vocab_size: when given, the set's vocabulary must exist and fit in it
      (`vocab.check_fits`).
  """
  eval_set = eval_sets_lib.get_eval_set(name)
  if model_vocab_size is not None:
    vocab.check_fits(eval_set.vocabulary, model_vocab_size, f"evaluation set {name!r}")
  if feature_lengths:
    eval_set = dataclasses.replace(eval_set, query_length=feature_lengths["queries"],
                                   document_length=feature_lengths["passages"])
  return eval_set


def evaluate_params(model: dual_encoder.DualEncoder, params: PyTree, mesh: jax.sharding.Mesh,
                    eval_sets: Sequence[str], *, output_dir: str | None = None,
                    metrics: Sequence[str] | None = None,
                    feature_lengths: dict[str, int] | None = None) -> dict[str, float]:
  """Retrieval metrics of the dual encoder `params["model"]` on each named evaluation set.

  Args:
    model: the DualEncoder module.
    params: {"model": ..., ...} (a TrainState's params, or `LoadedModel.params`).
    mesh: the mesh the params live on.
    eval_sets: registered evaluation set names.
    output_dir: where run files and result JSON go (None: nowhere).
    metrics: metric names (e.g. "mrr@10"); None: each set's protocol defaults.
    feature_lengths: {"queries": Lq, "passages": Lp} to tokenise queries / documents to instead
      of each set's own lengths; None: the sets' lengths.

  Returns:
    {"<eval set>/<metric>": value}.
  """
  encode_queries, encode_documents = encoding.dual_encoder_encode_fns(model, params["model"], mesh)
  results = retrieval.evaluate_eval_sets(
      list(eval_sets), encode_queries, encode_documents,
      get_eval_set=lambda name: get_eval_set(name, feature_lengths,
                                             model.config.encoder.vocab_size),
      output_dir=output_dir,
      mesh=mesh, metrics=metrics)
  return {k: float(v) for k, v in results.items()}
