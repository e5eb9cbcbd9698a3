"""Contrastive losses for dual encoders: in-batch softmax with SamToNe same-tower negatives.

(The encoder-decoder's token cross-entropy, `seq2seq_loss`, is at the end of this module.)

This is the one contrastive loss of the project (Moiseev et al. 2023, "SamToNe: Improving
Contrastive Loss for Dual Encoder Retrieval Models with Same Tower Negatives"). With queries `q_i`,
documents `d_i`
(row i of each is a positive pair), optional hard-negative documents `n_k` (every hard negative of
the batch is a candidate for every query) and `s(x, y) = x . y / temperature`:

  Query side (always), one softmax per query whose positive is `d_i`:

    L_q = -1/B sum_i log  e^{s(q_i,d_i)} / ( sum_j e^{s(q_i,d_j)}            # in-batch documents
                                            + sum_k e^{s(q_i,n_k)}            # hard negatives
                                            + sum_{j!=i} e^{s(q_i,q_j)} )     # same tower (SamToNe)

  Document side (when `bidirectional`), one softmax per document whose positive is `q_i`:

    L_d = -1/B sum_i log  e^{s(d_i,q_i)} / ( sum_j e^{s(d_i,q_j)} + sum_{j!=i} e^{s(d_i,d_j)} )

  The loss is `L_q + L_d` (plain sum). Hard negatives are never anchors and never appear in the
  document side. Without `same_tower_negatives` the last sum of each denominator is dropped, which
  gives the usual in-batch softmax loss of GTR / t5x_retrieval.

Duplicates (MultiReQA has repeated questions and shared answers): with `query_ids` /
`document_ids`, two items of a tower with the same id are never each other's negatives; such a
candidate is dropped from the denominator. In query i's row, `d_j` (j != i) is dropped if
`document_ids[j] == document_ids[i]` and `q_j` (j != i) if `query_ids[j] == query_ids[i]`;
symmetrically on the document side. The positive is never dropped, self pairs `q_i.q_i` and
`d_i.d_i` always are. Hard negatives carry no id and are never dropped.

Two views of one function, `contrastive_loss`:
  * `axis_name=None`: the global view; inputs are the whole batch, and one device holds the
    `[B, B]` logits. Fine for evaluation and small batches.
  * `axis_name="data"`: called inside `jax.shard_map` on the local shard of the batch. Each device
    all-gathers the candidates and computes only its `[b_local, B]` (and `[b_local, B * N]`) logit
    blocks, so no device ever holds a `[B, B]` buffer; loss, metrics and gradients equal the global
    view. `sharded_contrastive_loss` is the wrapper the trainer calls with a mesh.

Huge batches: with `row_chunk_size=r` the anchors are processed in blocks of `r` rows by a
`lax.scan` whose body is rematerialised (`jax.checkpoint`), so each device holds `[r, B]` logit
blocks (and their cotangents) instead of `[b_local, B]` ones; each block's logsumexp is recomputed
in the backward pass. The value and gradients are those of the unchunked loss.

Both are tested (tests/test_losses.py) against a float64 numpy implementation of the formula above,
values and gradients, and the sharded program is checked to hold no `[B, B]` buffer.

Metrics are sums and counts (divided on the host): `loss_sum` (= loss * B), `num_examples` (B),
`query_top1_correct` and, when bidirectional, `document_top1_correct`: the number of anchors whose
positive scores at least as high as every other candidate of their softmax row.
"""

from collections.abc import Collection, Hashable
import dataclasses
import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from samtone_jax.partitioning import DATA_AXIS
from samtone_jax.tasks import features

Array = jax.Array
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which contrastive loss is trained (bound by `gin/losses/*.gin` as `losses.LossConfig`).

  The defaults are SamToNe's (same-tower negatives, query side only, fixed temperature 0.01);
  each `gin/losses/*.gin` binds only the fields it changes.

  Attributes:
    temperature: softmax temperature (initial value when learned).
    learn_temperature: train `log_temperature` with the other parameters.
    same_tower_negatives: SamToNe: other queries are negatives of each query (and other documents
      of each document when bidirectional). False: the plain in-batch softmax loss.
    bidirectional: add the document-to-query loss.
    use_hard_negatives: feed the batch's "negatives" feature to the loss as extra candidates; how
      many per query is the task's (its examples' "negatives" feature), never bound here.
    mask_duplicates: pass the batch's query_ids / passage_ids so that repeated questions and shared
      answers are never each other's negatives.
  """

  temperature: float = 0.01
  learn_temperature: bool = False
  same_tower_negatives: bool = True
  bidirectional: bool = False
  use_hard_negatives: bool = False
  mask_duplicates: bool = True

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"LossConfig.temperature={self.temperature} must be > 0")

  def check_features(self, feature_names: Collection[str], where: str) -> None:
    """Raises ValueError unless `feature_names` has every feature this loss reads.

    The one check of it, applied to a task's output features before a run is built (trainer) and
    to a batch's keys when a step is traced (`train_step.model_inputs`).

    Args:
      feature_names: a task's output features, or a batch's keys.
      where: what they belong to, for the message (e.g. "task 'demo_manpages'").
    """
    if self.use_hard_negatives and features.NEGATIVES not in feature_names:
      raise ValueError(
          f"LossConfig.use_hard_negatives=True but {where} has no {features.NEGATIVES!r} "
          "feature: train on a task with hard negatives (e.g. a mined task, "
          "experiments/*_mined.gin) or use a loss file without them (losses/samtone.gin).")


# Masked logits get a large finite negative rather than -inf: exp() of it is exactly 0, and a block
# whose row is entirely masked (e.g. every document in the batch shares one id) still has a finite
# logsumexp, so neither the loss nor its gradient can become NaN.
_MASKED_LOGIT = -1e30


def _similarities(scaled_anchors: Array, candidates: Array) -> Array:
  """Dot products of temperature-scaled anchors with candidates.

  Args:
    scaled_anchors: [b, d] anchors already divided by the temperature.
    candidates: [n, d].

  Returns:
    [b, n] float32 logits.
  """
  # HIGHEST: at temperature 0.01 a bf16-pass matmul (TPU default) would put errors of ~0.1-1 nats on
  # the logits; this matmul is tiny next to the encoders, so full precision is cheap.
  return jnp.einsum("bd,nd->bn", scaled_anchors, candidates, precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def _anchor_side(anchors: Array, positives: Array, same_tower: Array, other_tower: Array,
                 hard_negatives: Array | None, temperature: Array, *, anchor_rows: Array,
                 anchor_same_ids: Array | None, anchor_other_ids: Array | None,
                 same_ids: Array | None, other_ids: Array | None,
                 same_tower_negatives: bool) -> tuple[Array, Array]:
  """Per-anchor softmax losses of one side (queries or documents as anchors).

  Args:
    anchors: [b, d] this device's anchors (global rows `anchor_rows`).
    positives: [b, d] their positives (this device's rows of the other tower).
    same_tower: [B, d] all items of the anchors' tower (global batch).
    other_tower: [B, d] all items of the other tower; row `anchor_rows[r]` is `positives[r]`.
    hard_negatives: [M, d] extra candidates from the other tower, or None.
    temperature: [] scalar.
    anchor_rows: [b] int global row index of each anchor.
    anchor_same_ids: [b] ids of the anchors in their own tower, or None (no id masking).
    anchor_other_ids: [b] ids of the anchors' positives in the other tower, or None.
    same_ids: [B] ids of `same_tower`, or None.
    other_ids: [B] ids of `other_tower`, or None.
    same_tower_negatives: whether `same_tower` items (other than the anchor) are candidates.

  Returns:
    (losses, top1_correct): [b] float32 `-log softmax(positive)` per anchor, and [b] bool whether
    the positive scores at least as high as every other candidate of its row.
  """
  # Scaling the [b, d] anchors instead of the [b, B] logits saves one [b, B] pass and buffer.
  scaled = anchors / temperature
  # The positive is a [b] elementwise product; in the [b, B] block it is masked out, so its
  # gradient does not need a [b, B] scatter.
  positive_logits = jnp.sum(scaled * positives, axis=1)  # [b]
  columns = jnp.arange(other_tower.shape[0])
  is_anchor_row = anchor_rows[:, None] == columns[None, :]  # [b, B]

  cross_masked = is_anchor_row
  if anchor_other_ids is not None:
    cross_masked = cross_masked | (anchor_other_ids[:, None] == other_ids[None, :])
  blocks = [jnp.where(cross_masked, _MASKED_LOGIT, _similarities(scaled, other_tower))]  # [b, B]
  if hard_negatives is not None:
    blocks.append(_similarities(scaled, hard_negatives))  # [b, M], never masked
  if same_tower_negatives:
    same_masked = is_anchor_row  # the anchor itself
    if anchor_same_ids is not None:
      same_masked = same_masked | (anchor_same_ids[:, None] == same_ids[None, :])
    blocks.append(jnp.where(same_masked, _MASKED_LOGIT, _similarities(scaled, same_tower)))

  # The row's logsumexp over [positive | b, B | b, M | b, B] is combined from per-block ones rather
  # than from a concatenated copy, which (with its cotangent) would double the largest buffers.
  block_lse = [jax.nn.logsumexp(block, axis=1) for block in blocks]
  losses = jax.nn.logsumexp(jnp.stack([positive_logits, *block_lse], axis=1), axis=1)
  losses = losses - positive_logits
  best_negative = jnp.max(jnp.stack([jnp.max(block, axis=1) for block in blocks], axis=1), axis=1)
  return losses, positive_logits >= best_negative


def _chunked_anchor_side(row_chunk_size: int, anchors: Array, positives: Array,
                         anchor_rows: Array, anchor_same_ids: Array | None,
                         anchor_other_ids: Array | None, **candidates: Any
                         ) -> tuple[Array, Array]:
  """`_anchor_side` over blocks of `row_chunk_size` anchors, one block live at a time.

  Args:
    row_chunk_size: r, anchors per block; must divide b. 0 (or r >= b): one block, no scan.
    anchors, positives: [b, d]; anchor_rows, anchor_same_ids, anchor_other_ids: [b] (ids may be
      None): the per-anchor arguments of `_anchor_side`, split into [b / r, r, ...] blocks.
    **candidates: the remaining `_anchor_side` arguments ([B, d] candidates, [B] ids, the
      temperature, ...), shared by every block.

  Returns:
    (losses [b], top1_correct [b]) exactly as `_anchor_side` returns them.
  """
  num_anchors = anchors.shape[0]
  per_anchor = dict(anchors=anchors, positives=positives, anchor_rows=anchor_rows,
                    anchor_same_ids=anchor_same_ids, anchor_other_ids=anchor_other_ids)
  if not row_chunk_size or row_chunk_size >= num_anchors:
    return _anchor_side(**per_anchor, **candidates)
  num_blocks = num_anchors // row_chunk_size
  blocks = jax.tree.map(lambda x: x.reshape(num_blocks, row_chunk_size, *x.shape[1:]),
                        per_anchor)

  # Rematerialised: the forward pass keeps only the block's inputs; the backward pass rebuilds
  # its [r, B] logits. Inside a scan XLA cannot merge the recomputation into the forward pass,
  # so common-subexpression protection is not needed (jax's advice for remat in loops).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def block_side(block):
    return _anchor_side(**block, **candidates)

  _, (losses, correct) = lax.scan(lambda carry, block: (carry, block_side(block)), None, blocks)
  return losses.reshape(num_anchors), correct.reshape(num_anchors)


def contrastive_loss(query: Array, document: Array, negatives: Array | None = None, *,
                     temperature: float | Array = 0.01, same_tower_negatives: bool = True,
                     bidirectional: bool = False, query_ids: Array | None = None,
                     document_ids: Array | None = None,
                     axis_name: Hashable | None = None,
                     row_chunk_size: int = 0) -> tuple[Array, Metrics]:
  """In-batch softmax contrastive loss with optional SamToNe same-tower negatives.

  See the module docstring for the formula. Shapes below: `b` is the local batch (the whole batch
  `B` when `axis_name` is None, `B / data-axis size` inside `shard_map`), `d` the embedding size,
  `N` the hard negatives per query.

  Args:
    query: [b, d] query embeddings; row i pairs with `document[i]`.
    document: [b, d] document embeddings.
    negatives: [b, N, d] hard-negative documents, or None. Every hard negative of the (global)
      batch is a candidate for every query; they are not anchors.
    temperature: python float or [] array (may be a learned parameter; gradients flow to it).
    same_tower_negatives: add the other queries (documents) to the query (document) side softmax.
    bidirectional: also add the document-side loss `L_d`.
    query_ids: [b] int ids; queries with equal ids are never each other's negatives. None: none.
    document_ids: [b] int ids; documents with equal ids are never each other's negatives.
    axis_name: None for the global view; inside `jax.shard_map`, the mesh axis the batch is sharded
      over. Inputs are then the local shards, gathered in tiled order (device k holds global rows
      `k * b .. (k + 1) * b - 1`).
    row_chunk_size: r > 0 computes the loss over blocks of r anchors (of this device's b), one
      at a time, recomputing each block in the backward pass: per-device memory O(r * B) instead
      of O(b * B), same value and gradients. Must divide b (r >= b: one block). 0: off.

  Returns:
    (loss, metrics): loss [] float32, the mean over the global batch of the per-example loss; the
    metrics are [] float32 global sums: "loss_sum" (loss * B), "num_examples" (B),
    "query_top1_correct" and, when bidirectional, "document_top1_correct". Inside `shard_map`
    they are psum'd, i.e. identical on every device.

  Raises:
    ValueError: on inconsistent shapes, a non-positive python temperature or a row_chunk_size
      that does not divide b.
  """
  _check_inputs(query, document, negatives, temperature, query_ids, document_ids, row_chunk_size)
  if negatives is not None and negatives.shape[1] == 0:
    negatives = None  # [b, 0, d]: an empty block would have no row maximum
  compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
  query = query.astype(compute_dtype)
  document = document.astype(compute_dtype)
  temperature = jnp.asarray(temperature, dtype=jnp.float32)
  num_local = query.shape[0]

  if axis_name is None:
    gather = lambda x: x
    first_row = 0
  else:
    gather = lambda x: lax.all_gather(x, axis_name, tiled=True)
    first_row = lax.axis_index(axis_name) * num_local
  anchor_rows = first_row + jnp.arange(num_local)

  all_queries = gather(query)  # [B, d]
  all_documents = gather(document)  # [B, d]
  all_negatives = None
  if negatives is not None:
    all_negatives = gather(negatives.astype(compute_dtype))  # [B, N, d]
    all_negatives = all_negatives.reshape(-1, all_negatives.shape[-1])  # [B * N, d]
  all_query_ids = None if query_ids is None else gather(query_ids)  # [B]
  all_document_ids = None if document_ids is None else gather(document_ids)  # [B]
  global_batch = all_queries.shape[0]

  query_losses, query_correct = _chunked_anchor_side(
      row_chunk_size, query, document, same_tower=all_queries, other_tower=all_documents,
      hard_negatives=all_negatives, temperature=temperature, anchor_rows=anchor_rows,
      anchor_same_ids=query_ids, anchor_other_ids=document_ids, same_ids=all_query_ids,
      other_ids=all_document_ids, same_tower_negatives=same_tower_negatives)
  local_loss_sum = jnp.sum(query_losses)
  metrics = {"query_top1_correct": jnp.sum(query_correct, dtype=jnp.float32)}
  if bidirectional:
    document_losses, document_correct = _chunked_anchor_side(
        row_chunk_size, document, query, same_tower=all_documents, other_tower=all_queries,
        hard_negatives=None, temperature=temperature, anchor_rows=anchor_rows,
        anchor_same_ids=document_ids, anchor_other_ids=query_ids, same_ids=all_document_ids,
        other_ids=all_query_ids, same_tower_negatives=same_tower_negatives)
    local_loss_sum = local_loss_sum + jnp.sum(document_losses)
    metrics["document_top1_correct"] = jnp.sum(document_correct, dtype=jnp.float32)
  metrics["loss_sum"] = local_loss_sum.astype(jnp.float32)

  if axis_name is not None:
    metrics = lax.psum(metrics, axis_name)
  metrics["num_examples"] = jnp.asarray(global_batch, jnp.float32)
  loss = metrics["loss_sum"] / global_batch
  return loss, metrics


def sharded_contrastive_loss(mesh: Mesh, query: Array, document: Array,
                             negatives: Array | None = None, *, data_axis: str = DATA_AXIS,
                             temperature: float | Array = 0.01, query_ids: Array | None = None,
                             document_ids: Array | None = None,
                             **kwargs: Any) -> tuple[Array, Metrics]:
  """`contrastive_loss` over a batch sharded along `data_axis` of `mesh`, via `jax.shard_map`.

  The entry point the trainer uses. Works under `jax.jit` and is differentiable w.r.t. query,
  document, negatives and temperature. Embeddings are taken as sharded `P(data_axis, None)` and
  replicated over every other mesh axis (e.g. `model`), where the loss is simply recomputed. Each
  device holds `[B / D_data, B]` logit blocks, never `[B, B]`.

  Args:
    mesh: the device mesh, e.g. from `partitioning.create_mesh` with axes (data, model).
    query: [B, d] global query embeddings.
    document: [B, d] global document embeddings.
    negatives: [B, N, d] global hard negatives, or None.
    data_axis: the mesh axis the batch is sharded over.
    temperature: python float or [] array (replicated).
    query_ids: [B] int ids, or None (sharded like the batch).
    document_ids: [B] int ids, or None.
    **kwargs: `same_tower_negatives`, `bidirectional`, `row_chunk_size` (anchors per block of
      each device's B / D_data), as in `contrastive_loss`.

  Returns:
    (loss, metrics) as in `contrastive_loss`: global values, replicated on every device.

  Raises:
    ValueError: if B is not divisible by the size of `data_axis`, or on bad shapes.
  """
  if data_axis not in mesh.shape:
    raise ValueError(f"losses.sharded_contrastive_loss: mesh has axes {tuple(mesh.shape)}, "
                     f"no data_axis={data_axis!r}.")
  num_shards = mesh.shape[data_axis]
  if query.shape[0] % num_shards:
    raise ValueError(f"losses.sharded_contrastive_loss: global batch {query.shape[0]} is not "
                     f"divisible by the {num_shards} shards of mesh axis {data_axis!r}.")
  arrays = {"query": query, "document": document, "temperature": jnp.asarray(temperature)}
  specs = {"query": P(data_axis, None), "document": P(data_axis, None), "temperature": P()}
  optional = {"negatives": (negatives, P(data_axis, None, None)),
              "query_ids": (query_ids, P(data_axis)), "document_ids": (document_ids, P(data_axis))}
  for name, (value, spec) in optional.items():
    if value is not None:
      arrays[name], specs[name] = value, spec

  def local_loss(local: dict[str, Array]) -> tuple[Array, Metrics]:
    local = dict(local)
    query_shard, document_shard = local.pop("query"), local.pop("document")
    return contrastive_loss(query_shard, document_shard, axis_name=data_axis, **local, **kwargs)

  mapped = jax.shard_map(local_loss, mesh=mesh, in_specs=(specs,), out_specs=P())
  return mapped(arrays)


def _check_inputs(query: Array, document: Array, negatives: Array | None,
                  temperature: float | Array, query_ids: Array | None,
                  document_ids: Array | None, row_chunk_size: int = 0) -> None:
  """Raises ValueError naming the offending argument; shapes are static so this costs nothing."""
  where = "losses.contrastive_loss"
  if query.ndim != 2 or query.shape != document.shape:
    raise ValueError(f"{where}: query {query.shape} and document {document.shape} must both be "
                     "[b, d] with equal shapes.")
  if negatives is not None and (negatives.ndim != 3 or negatives.shape[0] != query.shape[0]
                                or negatives.shape[2] != query.shape[1]):
    raise ValueError(f"{where}: negatives {negatives.shape} must be [b, N, d] = "
                     f"[{query.shape[0]}, N, {query.shape[1]}].")
  for name, ids in (("query_ids", query_ids), ("document_ids", document_ids)):
    if ids is not None and ids.shape != query.shape[:1]:
      raise ValueError(f"{where}: {name} {ids.shape} must be [b] = [{query.shape[0]}].")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"{where}: temperature must be > 0, got {temperature}.")
  num_anchors = query.shape[0]
  if row_chunk_size < 0 or (0 < row_chunk_size < num_anchors and num_anchors % row_chunk_size):
    raise ValueError(f"{where}: row_chunk_size={row_chunk_size} does not divide the {num_anchors} "
                     "anchors of this device (the batch, or the batch / data-axis size when "
                     "sharded); use a divisor of it, or 0 for no chunking.")


# --- Sequence-to-sequence token cross-entropy (the T5 encoder-decoder; SKILL) ---------------------

# Named `loss_normalizing_factor`s, T5X's `SpecialLossNormalizingFactor`s in lower case.
LOSS_NORMALIZING_FACTORS: tuple[str, ...] = (
    "num_real_target_tokens", "num_total_target_tokens", "average_per_sequence")


def seq2seq_loss(logits: Array, targets: Array, weights: Array | None = None, *,
                 loss_normalizing_factor: float | str | None = None, z_loss: float = 0.0,
                 label_smoothing: float = 0.0) -> tuple[Array, Metrics]:
  """Token cross-entropy of a sequence-to-sequence model, with T5X's normalisation and z-loss.

  Per target position t (T5X's `cross_entropy_with_logits`), with log_z = logsumexp(logits_t),
  soft targets q (1 - label_smoothing on the target, label_smoothing / (V - 1) elsewhere):

    loss_t = -sum_v q_v (logits_tv - log_z) - H(q) + z_loss * log_z^2

  (-H(q) = the entropy constant T5X subtracts so that a perfect prediction scores 0; it is 0
  without smoothing). The loss is sum_t weights_t * loss_t / normaliser, the normaliser being:
    None                       1: the weighted sum (T5X's default, loss_normalizing_factor=None);
    a number                   that constant (T5X's fixed LOSS_NORMALIZING_FACTOR, e.g. 233472 in
                               the T5 1.1 pre-training configs): gradients scale with the number
                               of real tokens in the batch, as in T5X;
    "num_real_target_tokens"   sum of weights: the mean over real tokens;
    "num_total_target_tokens"  b * l, padding included;
    "average_per_sequence"     each sequence's weights are divided by their sum (a mean over its
                               tokens), the normaliser is the number of sequences with a
                               non-zero weight: the mean over sequences of per-sequence means.

  This is the global view: under `jax.jit` with the batch sharded over the (data, model) mesh
  (logits [b, l, V] as ('batch', 'length', 'vocab')), the sums are global and XLA inserts the
  reductions; it needs no shard_map.

  Args:
    logits: float [b, l, V] next-token logits (computed in float32 here).
    targets: int [b, l] target ids.
    weights: float [b, l] loss weights; None: targets > 0 (T5X's `decoder_loss_weights`).
    loss_normalizing_factor: see above.
    z_loss: coefficient of the log_z^2 auxiliary loss (1e-4 in T5X's T5 configs); 0: off.
    label_smoothing: in [0, 1).

  Returns:
    (loss, metrics): loss [] float32 as above; metrics are [] float32 sums and counts, divided on
    the host: "loss_sum" (loss * b) and "num_examples" (b), so that the trainer's
    loss_sum / num_examples is the loss; "cross_entropy_sum" (sum_t weights_t * loss_t without
    the z-loss term, unnormalised), "z_loss_sum" (sum_t weights_t * z_loss * log_z^2),
    "num_tokens" (sum of weights), "token_correct" (weighted count of argmax == target).

  Raises:
    ValueError: mismatched shapes, an unknown named factor, a non-positive factor or a
      label_smoothing outside [0, 1).
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2]:
    raise ValueError(f"seq2seq_loss: logits {logits.shape} must be [b, l, V] and targets "
                     f"{targets.shape} [b, l].")
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"seq2seq_loss: weights {weights.shape} must have the targets' shape "
                     f"{targets.shape}.")
  if isinstance(loss_normalizing_factor, str):
    if loss_normalizing_factor not in LOSS_NORMALIZING_FACTORS:
      raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor!r}; expected a "
                       f"number, None or one of {LOSS_NORMALIZING_FACTORS}.")
  elif loss_normalizing_factor is not None and not loss_normalizing_factor > 0:
    raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor!r} must be positive.")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1).")

  batch, length, vocab = logits.shape
  logits = logits.astype(jnp.float32)
  token_weights = (targets > 0) if weights is None else weights
  token_weights = token_weights.astype(jnp.float32)

  log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, l]
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
  cross_entropy = log_z - target_logit
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    sum_logits = jnp.sum(logits, axis=-1)
    # -sum_v q_v (logits_v - log_z) = log_z - confidence * logit_t - low * sum_{v != t} logit_v.
    cross_entropy = (log_z - confidence * target_logit
                     - low * (sum_logits - target_logit))
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    cross_entropy = cross_entropy - entropy
  z_term = z_loss * jnp.square(log_z)

  normalised_weights = token_weights
  if loss_normalizing_factor is None:
    normaliser = jnp.float32(1.0)
  elif loss_normalizing_factor == "num_real_target_tokens":
    normaliser = jnp.sum(token_weights)
  elif loss_normalizing_factor == "num_total_target_tokens":
    normaliser = jnp.float32(batch * length)
  elif loss_normalizing_factor == "average_per_sequence":
    per_sequence = jnp.sum(token_weights, axis=-1, keepdims=True)
    normalised_weights = token_weights / jnp.where(per_sequence > 0, per_sequence, 1.0)
    normaliser = jnp.sum(normalised_weights)
  else:
    normaliser = jnp.float32(loss_normalizing_factor)
  # An all-padding batch has nothing to normalise: its loss is 0, not NaN.
  normaliser = jnp.where(normaliser > 0, normaliser, 1.0)

  loss = jnp.sum((cross_entropy + z_term) * normalised_weights) / normaliser
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      "loss_sum": loss * batch,
      "num_examples": jnp.float32(batch),
      "cross_entropy_sum": jnp.sum(cross_entropy * token_weights),
      "z_loss_sum": jnp.sum(z_term * token_weights),
      "num_tokens": jnp.sum(token_weights),
      "token_correct": jnp.sum(correct * token_weights),
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class Seq2SeqLossConfig:
  """The encoder-decoder's loss (`seq2seq_loss`), bound from gin like the contrastive one.

  Attributes:
    loss_normalizing_factor: None, a number, or one of LOSS_NORMALIZING_FACTORS. Default: the
      mean over real target tokens, whose scale does not depend on the batch (T5X's function
      default is None, the plain sum; its T5 1.1 gin configs use the constant 233472).
    z_loss: coefficient of the log_z^2 term (T5X: 1e-4).
    label_smoothing: in [0, 1).
  """

  loss_normalizing_factor: float | str | None = "num_real_target_tokens"
  z_loss: float = 1e-4
  label_smoothing: float = 0.0

  def __post_init__(self):
    factor = self.loss_normalizing_factor
    if isinstance(factor, str) and factor not in LOSS_NORMALIZING_FACTORS:
      raise ValueError(f"Seq2SeqLossConfig.loss_normalizing_factor={factor!r}; expected a "
                       f"number, None or one of {LOSS_NORMALIZING_FACTORS}.")
    if not isinstance(factor, (str, type(None))) and not factor > 0:
      raise ValueError(f"Seq2SeqLossConfig.loss_normalizing_factor={factor!r} must be positive.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"Seq2SeqLossConfig.label_smoothing={self.label_smoothing!r} must be in "
                       "[0, 1).")
