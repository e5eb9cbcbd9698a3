"""Loading a trained dual encoder and running it on evaluation sets: the one home for both.

Every command that reads a checkpoint (`samtone_jax.evaluate`, `samtone_jax.encode`, and the
commands built on them) and the trainer's in-training evaluation go through this module, so a
model is restored, its eval sets are tokenised and its metrics computed one way only.

  loaded = runner.load_model(checkpoint_path, model_config)
  results = runner.evaluate_params(loaded.module, loaded.params, loaded.mesh, ["demo_manpages_test"])
"""

from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from samtone_jax import checkpoints
from samtone_jax import io_utils
from samtone_jax import model_kinds
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
    step_dir: the checkpoints/<step> directory they were read from.
  """

  module: dual_encoder.DualEncoder
  params: PyTree
  mesh: jax.sharding.Mesh
  step_dir: str | None = None

  def encode_fns(self) -> tuple[encoding.EncodeFn, encoding.EncodeFn]:
    """(encode_queries, encode_documents): token ids [n, L] -> embeddings, on the mesh."""
    return encoding.dual_encoder_encode_fns(self.module, self.params["model"], self.mesh)


def is_public_weights(path: str) -> bool:
  """True for a sentence-transformers (modules.json) or Hugging Face T5 (config.json) directory."""
  return any(io_utils.exists(os.path.join(path, name)) for name in ("modules.json", "config.json"))


def load_model(checkpoint_path: str, model: model_config_lib.DualEncoderConfig,
               mesh_shape: tuple[int, int] = (-1, 1)) -> LoadedModel:
  """Restores the DualEncoder params of `checkpoint_path`, sharded on a new mesh.

  Args:
    checkpoint_path: a run directory (its latest checkpoint), its checkpoints/ directory, or one
      checkpoints/<step> directory; or public weights, imported like INITIAL_CHECKPOINT_PATH
      (`checkpoints.load_initial_params`): a sentence-transformers GTR directory (encoder and
      projection), or a Hugging Face T5 directory (encoder only: the projection keeps its seed-0
      initialisation).
    model: the architecture the checkpoint was trained with (for public weights: matching them);
      or a `seq2seq_model.EncoderDecoderModel`, restored from a samtone_jax checkpoint (then
      `module` is that model and `params` {"model": EncoderDecoder params}).
    mesh_shape: (data, model) mesh sizes; -1 fills.
  """
  mesh = partitioning.create_mesh(*mesh_shape)
  if model_kinds.is_seq2seq(model):  # the encoder-decoder: our checkpoints only; module = model
    from samtone_jax import seq2seq_step  # pylint: disable=g-import-not-at-top
    step_dir = checkpoints.resolve_step_dir(checkpoint_path)
    abstract = {"model": seq2seq_step.abstract_model_params_of(model, mesh)}
    return LoadedModel(model, checkpoints.restore_params(step_dir, abstract), mesh, step_dir)
  module = dual_encoder.DualEncoder(model)
  if not checkpoints.is_samtone_checkpoint(checkpoint_path) and is_public_weights(
      checkpoint_path):
    dummy = jnp.zeros((1, 8), jnp.int32)
    variables, _ = partitioning.sharded_init(
        lambda rng: module.init({"params": rng, "dropout": rng}, dummy, dummy), mesh,
        train_step_lib.init_key(0))
    params = checkpoints.load_initial_params(checkpoint_path, {"model": variables["params"]},
                                             model)
    return LoadedModel(module, params, mesh)
  abstract = {"model": train_step_lib.abstract_model_params_of(model, mesh)}
  step_dir = checkpoints.resolve_step_dir(checkpoint_path)
  params = checkpoints.restore_params(step_dir, abstract)
  return LoadedModel(module, params, mesh, step_dir)


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
                    feature_lengths: dict[str, int] | None = None,
                    ignore_identical_ids: bool | None = None,
                    embeddings_dir: str | None = None, embedding_dtype: str = "float32",
                    eval_set_cache: dict[str, eval_sets_lib.EvalSet] | None = None
                    ) -> dict[str, float]:
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
    ignore_identical_ids: drop a retrieved document whose id equals the query id; None: each
      set's protocol decides (BEIR's rule for "beir" sets; see evaluation/retrieval.py).
    embeddings_dir: if given, each set's corpus embeddings are written as shards to
      `<embeddings_dir>/<eval set>/` (local or gs://) and searched from there, so the corpus
      embeddings are never all in host memory; None: in memory. Either way each process encodes
      and searches only its slice of the corpus (`retrieval.retrieve`).
    embedding_dtype: "float32" or "bfloat16", how corpus embeddings are stored
      (EVAL_EMBEDDING_DTYPE); the search accumulates in float32.
    eval_set_cache: a dict the caller keeps between calls (the trainer's eval hook): sets parsed
      once are reused from it, and new ones are added. None: every set is read anew (and freed
      when this call returns).

  Returns:
    {"<eval set>/<metric>": value}.
  """
  encode_queries, encode_documents = encoding.dual_encoder_encode_fns(model, params["model"], mesh)
  results = {}
  for name in eval_sets:
    if eval_set_cache is not None and name in eval_set_cache:
      eval_set = eval_set_cache[name]
    else:
      eval_set = get_eval_set(name, feature_lengths, model.config.encoder.vocab_size)
      if eval_set_cache is not None:
        eval_set_cache[name] = eval_set
    values = retrieval.evaluate_eval_set(
        eval_set, encode_queries, encode_documents, output_dir=output_dir, mesh=mesh,
        metrics=metrics, ignore_identical_ids=ignore_identical_ids,
        embeddings_dir=None if embeddings_dir is None else os.path.join(embeddings_dir, name),
        embedding_dtype=embedding_dtype)
    del eval_set  # not kept past its evaluation unless cached
    results.update({f"{name}/{metric}": float(value) for metric, value in values.items()})
  return results
