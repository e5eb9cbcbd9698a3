"""The SamToNe dual encoder as a t5x model, for users who run everything through `t5x.train`.

Optional: this module imports t5x, which is not on PyPI (install it from its source, see
docs/t5x.md). Nothing else in samtone_jax imports it. `DualEncoderModel` implements t5x's
`BaseModel` contract (not the decoder-oriented `BaseTransformerModel`) on top of the very same
pieces our own trainer uses:

  * the module is `samtone_jax.models.dual_encoder.DualEncoder`;
  * `loss_fn` is `samtone_jax.train_step.loss_and_metrics` (hence `losses.contrastive_loss`) in its
    global view; under t5x's `PjitPartitioner` the whole step is one pjit program, so GSPMD
    partitions the loss like every other op (our own trainer runs the `shard_map` form instead;
    both give the same loss, see tests/test_t5x.py);
  * batches come from `samtone_jax.tasks.feature_converter.DualEncoderFeatureConverter`.

The parameter tree is our trainer's, {"model": DualEncoder params, "loss": {"log_temperature"}},
except that "loss" is left out when the temperature is fixed (t5x drops empty subtrees). t5x
partitions parameters and factors Adafactor moments by logical axis names, which it reads
from a "params_axes" collection (flax's old `param_with_axes` convention). Our model carries the
names on the params themselves (`nn.with_logical_partitioning`), so `get_initial_variables`
converts them into that collection; `logical_axis_rules()` and `adafactor_factor_rules()` give
t5x the rules for our names (bound in gin/t5x/*.gin).
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import clu.metrics as clu_metrics
import flax
import flax.linen as nn
from flax.linen import partitioning as flax_partitioning
import jax
import jax.numpy as jnp
import seqio
from t5x import adafactor
from t5x import metrics as t5x_metrics
from t5x import models as t5x_models
from t5x import partitioning as t5x_partitioning

from samtone_jax import losses
from samtone_jax import partitioning
from samtone_jax import train_step
from samtone_jax.models import config as model_config_lib
from samtone_jax.models import dual_encoder
from samtone_jax.tasks import feature_converter
from samtone_jax.tasks import features

Array = jax.Array
PyTree = Any


def logical_axis_rules() -> list[tuple[str, str | None]]:
  """Our logical-axis -> mesh-axis rules, for `partitioning.PjitPartitioner.logical_axis_rules`.

  They are `samtone_jax.partitioning.LOGICAL_AXIS_RULES`, the project's one rule list; t5x's mesh
  axes are named `data` and `model` like ours.
  """
  return list(partitioning.LOGICAL_AXIS_RULES)


def adafactor_factor_rules() -> Mapping[str, adafactor.FactorDim]:
  """t5x's Adafactor factorisation rules extended by the axis names only our params use.

  The projection kernel is [d, P] ('embed', 'projection'): its second moment is factored into a
  row ('embed') and a column ('projection') vector, like every other [in, out] kernel. The
  stacked-layer axis of `scan_layers` params ('layers') is a batch axis: one set of statistics per
  layer.
  """
  rules = dict(adafactor.standard_logical_factor_rules())
  rules["projection"] = adafactor.FactorDim.COLUMN
  # Stacked layers (T5Config.scan_layers): statistics per layer, as if unrolled.
  rules["layers"] = adafactor.FactorDim.BATCH
  return flax.core.freeze(rules)


class PjitPartitioner(t5x_partitioning.PjitPartitioner):
  """t5x's `PjitPartitioner`, except that on CPU its mesh honours `num_partitions`.

  On CPU, t5x's default mesh is (processes, local devices) whatever `num_partitions` says: every
  local device lands on the 'model' axis (and t5x's `ici_mesh_shape` needs TPU slice indices). So
  on CPU this builds `samtone_jax.partitioning.create_mesh(data=-1, model=num_partitions)`, our
  trainer's (data, model) mesh; TPU and GPU keep t5x's own mesh (and `model_parallel_submesh`).
  Everything else (partitioning of the train state by `params_axes`, data layout, pjit) is t5x's.
  """

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    if (jax.devices(self._backend)[-1].platform == "cpu"
        and not self._model_parallel_submesh and self._ici_mesh_shape is None):
      return partitioning.create_mesh(data=-1, model=self._num_partitions,
                                      devices=jax.devices(self._backend))
    return super().mesh


def _params_axes(boxed_params: PyTree, where: str) -> dict[str, Any]:
  """{..., name: LogicallyPartitioned} -> {..., name + "_axes": AxisMetadata(names)}.

  This is the layout flax's `param_with_axes` writes into the "params_axes" collection and t5x's
  `flax_partitioning.get_axis_names` reads back.

  Raises:
    ValueError: naming the parameter, if one carries no logical axis names.
  """
  result = {}
  for key, value in boxed_params.items():
    if isinstance(value, nn.LogicallyPartitioned):
      result[f"{key}_axes"] = flax_partitioning.AxisMetadata(names=tuple(value.names))
    elif isinstance(value, Mapping):
      result[key] = _params_axes(value, f"{where}/{key}")
    else:
      raise ValueError(f"t5x_model: parameter {where}/{key} has no logical axis names; every "
                       "parameter must be created with nn.with_logical_partitioning.")
  return result


class DualEncoderModel(t5x_models.BaseModel):
  """t5x `BaseModel` for the SamToNe dual encoder.

  Batches (from `DualEncoderFeatureConverter`): queries int32 [B, Lq], passages int32 [B, Lp],
  query_ids / passage_ids int32 [B], and negatives int32 [B, N, Lp] with hard negatives.

  Attributes:
    model_config: the dual encoder architecture.
    loss_config: the contrastive loss (temperature, SamToNe, hard negatives, ...).
    module: the `DualEncoder` Linen module.
  """

  FEATURE_CONVERTER_CLS: Callable[..., seqio.FeatureConverter] = (
      feature_converter.DualEncoderFeatureConverter)

  def __init__(self, model_config: model_config_lib.DualEncoderConfig,
               loss_config: losses.LossConfig, optimizer_def: Any):
    """Builds the model.

    Args:
      model_config: the dual encoder architecture.
      loss_config: the contrastive loss; `use_hard_negatives` also makes the feature converter
        emit the "negatives" feature.
      optimizer_def: a t5x optimizer, e.g. `adafactor.Adafactor` with
        `logical_factor_rules=adafactor_factor_rules()`.

    Raises:
      ValueError: for ADE-FTE with an optimizer that applies weight decay (the frozen embedder gets
        a zero gradient, so only weight decay could move it).
    """
    super().__init__(optimizer_def=optimizer_def)
    self.model_config = model_config
    self.loss_config = loss_config
    self.module = dual_encoder.DualEncoder(model_config)
    # Instance attribute: t5x reads `model.FEATURE_CONVERTER_CLS(pack=...)`.
    self.FEATURE_CONVERTER_CLS = functools.partial(  # pylint: disable=invalid-name
        feature_converter.DualEncoderFeatureConverter,
        with_negatives=loss_config.use_hard_negatives)
    hyper_params = getattr(optimizer_def, "hyper_params", None)
    if (dual_encoder.FROZEN_PARTS.get(model_config.tower_sharing)
        and getattr(hyper_params, "weight_decay_rate", None)):
      raise ValueError(f"t5x_model.DualEncoderModel: tower_sharing={model_config.tower_sharing!r} "
                       "freezes the shared token embedder through a zero gradient; the optimizer's "
                       f"weight_decay_rate={hyper_params.weight_decay_rate} would still move it. "
                       "Set it to None.")

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, jnp.dtype] | None = None
                            ) -> flax.core.FrozenDict:
    """{"params": {"model", "loss"}, "params_axes": the same tree of AxisMetadata}.

    Args:
      rng: PRNG key.
      input_shapes: global batch shapes per feature (queries [B, Lq], passages [B, Lp], ...).
      input_types: their dtypes (default int32).
    """
    input_types = input_types or {}

    def dummy(name):  # Parameter shapes do not depend on the batch size: build with one row.
      return jnp.ones((1,) + tuple(input_shapes[name][1:]), input_types.get(name, jnp.int32))

    negatives = dummy(features.NEGATIVES) if self.loss_config.use_hard_negatives else None
    boxed = self.module.init({"params": rng, "dropout": rng}, dummy(features.QUERIES),
                             dummy(features.PASSAGES), negatives)["params"]
    params = {"model": nn.meta.unbox(boxed)}
    params_axes = {"model": _params_axes(boxed, "model")}
    # t5x's state dicts drop empty subtrees, so "loss" exists only when it holds a parameter.
    if self.loss_config.learn_temperature:
      params["loss"] = {
          "log_temperature": jnp.log(jnp.float32(self.loss_config.temperature))}
      params_axes["loss"] = {"log_temperature_axes": flax_partitioning.AxisMetadata(names=())}
    return flax.core.freeze({"params": params, "params_axes": params_axes})

  def loss_fn(self, params: PyTree, batch: Mapping[str, Array], dropout_rng: Array | None
              ) -> tuple[Array, t5x_models.MetricsMap]:
    """The contrastive loss of the (global) batch and t5x's clu metrics.

    Args:
      params: {"model", "loss"}.
      batch: see the class docstring.
      dropout_rng: dropout key; None runs the towers deterministically (t5x's eval_fn).

    Returns:
      (loss [], metrics): "loss" (mean per step), "query_top1_accuracy" (in-batch retrieval
      accuracy; "document_top1_accuracy" too when bidirectional), "temperature", and t5x's
      "timing/*" throughput metrics.
    """
    # t5x drops the empty "loss" subtree of a fixed temperature; our step function reads it.
    params = {"loss": {}, **params}
    loss, sums = train_step.loss_and_metrics(params, dict(batch), model=self.module,
                                             loss_config=self.loss_config, mesh=None,
                                             dropout_rng=dropout_rng)
    num_examples = sums["num_examples"]
    metrics = {
        "loss": t5x_metrics.AveragePerStep(total=loss),
        "query_top1_accuracy": clu_metrics.Average(total=sums["query_top1_correct"],
                                                   count=num_examples),
        "temperature": t5x_metrics.AveragePerStep(
            total=jnp.asarray(train_step.temperature_of(params, self.loss_config), jnp.float32)),
        "timing/seqs_per_second": t5x_metrics.TimeRate.from_model_output(
            numerator=num_examples),
        "timing/steps_per_second": t5x_metrics.StepsPerTime.from_model_output(),
        "timing/seconds": t5x_metrics.Time(),
        "timing/seqs": t5x_metrics.Sum(num_examples),
    }
    if "document_top1_correct" in sums:
      metrics["document_top1_accuracy"] = clu_metrics.Average(
          total=sums["document_top1_correct"], count=num_examples)
    return loss, metrics

  def _embed(self, params: PyTree, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"query_embeddings" [B, P], "document_embeddings" [B, P]} for the features present."""
    variables = {"params": params["model"]}
    embeddings = {}
    if features.QUERIES in batch:
      embeddings["query_embeddings"] = self.module.apply(
          variables, batch[features.QUERIES], method=dual_encoder.DualEncoder.encode_queries)
    if features.PASSAGES in batch:
      embeddings["document_embeddings"] = self.module.apply(
          variables, batch[features.PASSAGES], method=dual_encoder.DualEncoder.encode_documents)
    if not embeddings:
      raise ValueError(f"t5x_model: the batch has neither {features.QUERIES!r} nor "
                       f"{features.PASSAGES!r}; it has {sorted(batch)}.")
    return embeddings

  def score_batch(self, params: PyTree, batch: Mapping[str, Array],
                  return_intermediates: bool = False
                  ) -> Array | tuple[Array, Mapping[str, Array]]:
    """Similarity of each query with its own passage (`t5x.infer` mode 'score').

    Returns:
      float32 [B] dot products of the query and document embeddings (cosine similarities when
      `normalize`); with `return_intermediates`, also {"query_embeddings", "document_embeddings"}.
    """
    missing = {features.QUERIES, features.PASSAGES} - set(batch)
    if missing:
      raise ValueError(f"t5x_model.score_batch: the batch lacks {sorted(missing)}; "
                       f"it has {sorted(batch)}.")
    embeddings = self._embed(params, batch)
    scores = jnp.sum(embeddings["query_embeddings"] * embeddings["document_embeddings"], axis=-1)
    if return_intermediates:
      return scores, embeddings
    return scores

  def predict_batch_with_aux(self, params: PyTree, batch: Mapping[str, Array],
                             rng: Array | None = None
                             ) -> tuple[Array, Mapping[str, Array]]:
    """Embeddings (for corpus encoding through t5x's infer functions or InteractiveModel).

    Args:
      params: {"model", "loss"}.
      batch: queries [B, Lq] and/or passages [B, Lp].
      rng: unused; the towers run deterministically.

    Returns:
      (embeddings [B, P] of the queries, or of the passages when the batch has no queries,
       {"query_embeddings", "document_embeddings"} for the features present).
    """
    del rng
    embeddings = self._embed(params, batch)
    predictions = embeddings.get("query_embeddings", embeddings.get("document_embeddings"))
    return predictions, embeddings
