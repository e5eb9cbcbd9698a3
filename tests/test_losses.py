"""Tests of samtone_jax.losses against a float64 numpy reference written from the paper's formula.

The reference builds each anchor's softmax row candidate by candidate (explicit loops, no JAX) and
differentiates it by hand (softmax minus one-hot); the hand gradient is itself checked against
finite differences. The global view (`axis_name=None`) and the `shard_map` form on (data=8,
model=1) and (data=4, model=2) meshes must both match it, values and gradients. A compile-only
test checks that the sharded program never holds a [B, B] buffer.
"""

import functools
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from samtone_jax import losses
from samtone_jax.partitioning import create_mesh

BATCH = 16
DIM = 8
# Repeated questions / shared answers; runs cross device boundaries (2 rows per device on 8).
DUPLICATE_QUERY_IDS = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11])
DUPLICATE_DOCUMENT_IDS = np.array([0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 7, 8, 9, 10, 11])
MESH_SHAPES = {"global": None, "mesh8x1": (8, 1), "mesh4x2": (4, 2)}
# Anchors per block for the row-chunked loss: several blocks of each device's rows (16 global,
# 2 per device on 8, 4 per device on 4).
ROW_CHUNK_SIZES = {"global": 4, "mesh8x1": 1, "mesh4x2": 2}


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------------------------
# Reference: numpy float64, from the formula.


def reference_loss(query, document, negatives, temperature, *, same_tower_negatives,
                   bidirectional, query_ids=None, document_ids=None):
  """Loss, hand-derived gradients and metrics of the SamToNe loss, one softmax row at a time.

  Args:
    query, document: [B, D]; negatives: [B, N, D] or None; temperature: float.

  Returns:
    (loss, grads, metrics): grads has keys query [B, D], document [B, D], negatives [B, N, D] (or
    None) and temperature (float).
  """
  query = np.asarray(query, np.float64)
  document = np.asarray(document, np.float64)
  batch, dim = query.shape
  hard = (np.zeros((0, dim)) if negatives is None
          else np.asarray(negatives, np.float64).reshape(-1, dim))
  query_ids = np.arange(batch) if query_ids is None else np.asarray(query_ids)
  document_ids = np.arange(batch) if document_ids is None else np.asarray(document_ids)
  vectors = {"q": query, "d": document, "n": hard}
  ids = {"q": query_ids, "d": document_ids}
  grads = {name: np.zeros_like(v) for name, v in vectors.items()}
  grad_temperature = 0.0
  total = 0.0
  correct = {"q": 0, "d": 0}

  sides = [("q", "d")] + ([("d", "q")] if bidirectional else [])
  for anchor_tower, other_tower in sides:
    for i in range(batch):
      # Candidates as (tower, row); the positive first.
      candidates = [(other_tower, i)]
      candidates += [(other_tower, j) for j in range(batch)
                     if j != i and ids[other_tower][j] != ids[other_tower][i]]
      if anchor_tower == "q":
        candidates += [("n", k) for k in range(len(hard))]
      if same_tower_negatives:
        candidates += [(anchor_tower, j) for j in range(batch)
                       if j != i and ids[anchor_tower][j] != ids[anchor_tower][i]]
      anchor = vectors[anchor_tower][i]
      logits = np.array([anchor @ vectors[t][k] / temperature for t, k in candidates])
      top = logits.max()
      log_normaliser = top + np.log(np.sum(np.exp(logits - top)))
      total += log_normaliser - logits[0]
      correct[anchor_tower] += int(logits[0] >= top)
      # d(loss_i / B) / d logit_c = (softmax_c - [c is the positive]) / B.
      dlogits = np.exp(logits - log_normaliser)
      dlogits[0] -= 1.0
      dlogits /= batch
      for c, (tower, k) in enumerate(candidates):
        grads[anchor_tower][i] += dlogits[c] * vectors[tower][k] / temperature
        grads[tower][k] += dlogits[c] * anchor / temperature
      grad_temperature += np.sum(dlogits * -logits / temperature)

  metrics = {"loss_sum": total, "num_examples": float(batch), "query_top1_correct": correct["q"]}
  if bidirectional:
    metrics["document_top1_correct"] = correct["d"]
  grads_out = {"query": grads["q"], "document": grads["d"],
               "negatives": None if negatives is None else grads["n"].reshape(negatives.shape),
               "temperature": grad_temperature}
  return total / batch, grads_out, metrics


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(seed, num_negatives, *, batch=BATCH, dim=DIM, duplicates=False):
  """L2-normalised embeddings whose positives are correlated (so top-1 counts are non-trivial).

  With `duplicates`, items sharing an id are identical vectors, as repeated MultiReQA questions
  and shared answers are.
  """
  rng = np.random.default_rng(seed)
  query = _normalise(rng.normal(size=(batch, dim)))
  document = _normalise(query + 0.8 * rng.normal(size=(batch, dim)))
  negatives = (_normalise(rng.normal(size=(batch, num_negatives, dim))) if num_negatives
               else None)
  if duplicates:
    first_of_query_id = np.unique(DUPLICATE_QUERY_IDS, return_index=True)[1]
    first_of_document_id = np.unique(DUPLICATE_DOCUMENT_IDS, return_index=True)[1]
    query = query[first_of_query_id[DUPLICATE_QUERY_IDS]]
    document = document[first_of_document_id[DUPLICATE_DOCUMENT_IDS]]
  as32 = lambda x: None if x is None else x.astype(np.float32)
  return as32(query), as32(document), as32(negatives)


def test_reference_gradient_matches_finite_differences():
  query, document, negatives = (np.float64(x) for x in make_batch(0, 2, batch=4, dim=3))
  ids = np.array([0, 1, 1, 2])
  kwargs = dict(same_tower_negatives=True, bidirectional=True, query_ids=ids,
                document_ids=ids[::-1])
  temperature = 0.2
  _, grads, _ = reference_loss(query, document, negatives, temperature, **kwargs)

  inputs = {"query": query, "document": document, "negatives": negatives,
            "temperature": np.array(temperature)}

  def loss_of(name, value):
    changed = dict(inputs, **{name: value})
    return reference_loss(changed["query"], changed["document"], changed["negatives"],
                          float(changed["temperature"]), **kwargs)[0]

  step = 1e-6
  for name, value in inputs.items():
    numeric = np.zeros_like(value)
    for index in np.ndindex(value.shape):
      plus, minus = value.copy(), value.copy()
      plus[index] += step
      minus[index] -= step
      numeric[index] = (loss_of(name, plus) - loss_of(name, minus)) / (2 * step)
    np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------------------------
# JAX loss vs the reference.


@functools.cache
def loss_and_grads(mode, same_tower_negatives, bidirectional, with_ids, row_chunk_size=0):
  """A jitted value_and_grad of the loss (global view or sharded on a mesh), cached per config.

  `row_chunk_size` > 0: the row-chunked form (anchors in blocks of that many per device).

  Returns f(query, document, negatives, temperature, query_ids, document_ids) ->
  ((loss, metrics), (d_query, d_document, d_negatives, d_temperature)).
  """
  mesh_shape = MESH_SHAPES[mode]
  kwargs = dict(same_tower_negatives=same_tower_negatives, bidirectional=bidirectional,
                row_chunk_size=row_chunk_size)

  def loss_fn(query, document, negatives, temperature, query_ids, document_ids):
    if not with_ids:
      query_ids = document_ids = None
    if mesh_shape is None:
      return losses.contrastive_loss(query, document, negatives, temperature=temperature,
                                     query_ids=query_ids, document_ids=document_ids, **kwargs)
    return losses.sharded_contrastive_loss(
        create_mesh(*mesh_shape), query, document, negatives, temperature=temperature,
        query_ids=query_ids, document_ids=document_ids, **kwargs)

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))


def assert_matches_reference(mode, query, document, negatives, temperature, *,
                             same_tower_negatives, bidirectional, query_ids, document_ids,
                             temperature_is_array=True, row_chunk_size=0):
  with_ids = query_ids is not None
  fn = loss_and_grads(mode, same_tower_negatives, bidirectional, with_ids, row_chunk_size)
  ids = (jnp.asarray(query_ids), jnp.asarray(document_ids)) if with_ids else (None, None)
  jax_temperature = jnp.float32(temperature) if temperature_is_array else temperature
  (loss, metrics), grads = fn(query, document, negatives, jax_temperature, *ids)
  want_loss, want_grads, want_metrics = reference_loss(
      query, document, negatives, temperature, same_tower_negatives=same_tower_negatives,
      bidirectional=bidirectional, query_ids=query_ids, document_ids=document_ids)

  context = (f"{mode} same_tower={same_tower_negatives} bidir={bidirectional} t={temperature} "
             f"row_chunk_size={row_chunk_size}")
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=context)
  assert set(metrics) == set(want_metrics), context
  np.testing.assert_allclose(metrics["loss_sum"], want_metrics["loss_sum"], rtol=1e-5)
  for key in set(want_metrics) - {"loss_sum"}:
    assert float(metrics[key]) == want_metrics[key], (context, key)

  names = ("query", "document", "negatives", "temperature")
  for name, got in zip(names, grads):
    want = want_grads[name]
    if want is None:
      assert got is None, (context, name)
      continue
    if name == "temperature" and not temperature_is_array:
      continue  # a python float has no gradient worth comparing
    # float32 logits of size ~1/temperature carry absolute errors ~1e-7/temperature; compare
    # relative to the gradient's scale.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                               err_msg=f"{context} d/d{name}")


@pytest.mark.parametrize("row_chunked", [False, True])
@pytest.mark.parametrize("num_negatives", [0, 1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("same_tower_negatives", [True, False])
@pytest.mark.parametrize("mode", list(MESH_SHAPES))
def test_matches_reference(mode, same_tower_negatives, bidirectional, num_negatives,
                           row_chunked):
  """Both forms, unchunked and row-chunked, equal the reference (so each other) to 1e-5."""
  query, document, negatives = make_batch(1 + num_negatives, num_negatives, duplicates=True)
  for temperature in (0.01, 0.05):  # same compiled function: temperature is an array argument
    assert_matches_reference(
        mode, query, document, negatives, temperature,
        same_tower_negatives=same_tower_negatives, bidirectional=bidirectional,
        query_ids=DUPLICATE_QUERY_IDS, document_ids=DUPLICATE_DOCUMENT_IDS,
        row_chunk_size=ROW_CHUNK_SIZES[mode] if row_chunked else 0)


@pytest.mark.parametrize("mode", list(MESH_SHAPES))
def test_without_ids_and_with_python_temperature(mode):
  query, document, negatives = make_batch(7, 2)
  assert_matches_reference(mode, query, document, negatives, 0.05, same_tower_negatives=True,
                           bidirectional=True, query_ids=None, document_ids=None,
                           temperature_is_array=False)


def test_zero_hard_negatives_array_equals_none():
  query, document, _ = make_batch(5, 0)
  empty = np.zeros((BATCH, 0, DIM), np.float32)
  with_empty = losses.contrastive_loss(query, document, empty, bidirectional=True)
  without = losses.contrastive_loss(query, document, None, bidirectional=True)
  np.testing.assert_allclose(with_empty[0], without[0], rtol=1e-6)
  want_loss = reference_loss(query, document, None, 0.01, same_tower_negatives=True,
                             bidirectional=True)[0]
  np.testing.assert_allclose(with_empty[0], want_loss, rtol=1e-5)


def test_all_candidates_masked_gives_finite_loss_and_zero_gradient():
  """Every item shares one id: each row holds only its positive, so the loss is exactly 0."""
  query, document, _ = make_batch(3, 0)
  same = np.zeros(BATCH, np.int32)
  fn = loss_and_grads("global", True, True, True)
  (loss, metrics), grads = fn(query, document, None, jnp.float32(0.01), same, same)
  assert float(loss) == 0.0
  assert float(metrics["query_top1_correct"]) == float(metrics["document_top1_correct"]) == BATCH
  for grad in (grads[0], grads[1], grads[3]):
    np.testing.assert_array_equal(grad, 0.0)


def test_sharded_equals_global_under_jit_with_sharded_inputs():
  """Inputs already laid out P('data') on a (4, 2) mesh, as the trainer passes them."""
  mesh = create_mesh(4, 2)
  query, document, negatives = make_batch(11, 1)
  place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  sharded = jax.jit(functools.partial(losses.sharded_contrastive_loss, mesh, bidirectional=True))(
      place(query, "data", None), place(document, "data", None),
      place(negatives, "data", None, None))
  want_loss, _, want_metrics = reference_loss(query, document, negatives, 0.01,
                                              same_tower_negatives=True, bidirectional=True)
  np.testing.assert_allclose(sharded[0], want_loss, rtol=1e-5)
  assert float(sharded[1]["query_top1_correct"]) == want_metrics["query_top1_correct"]
  assert sharded[0].sharding.is_fully_replicated


def test_bad_inputs_raise_clear_errors():
  query, document, negatives = make_batch(0, 1)
  with pytest.raises(ValueError, match="negatives"):
    losses.contrastive_loss(query, document, negatives[:, :, :4])
  with pytest.raises(ValueError, match="query_ids"):
    losses.contrastive_loss(query, document, query_ids=np.arange(3))
  with pytest.raises(ValueError, match="temperature"):
    losses.contrastive_loss(query, document, temperature=0.0)
  with pytest.raises(ValueError, match="not divisible"):
    losses.sharded_contrastive_loss(create_mesh(8, 1), query[:12], document[:12])
  # Both numbers are named: the chunk and this device's anchors (16 / 4 on a (4, 2) mesh).
  with pytest.raises(ValueError, match="row_chunk_size=3 does not divide the 16 anchors"):
    losses.contrastive_loss(query, document, row_chunk_size=3)
  with pytest.raises(ValueError, match="row_chunk_size=3 does not divide the 4 anchors"):
    losses.sharded_contrastive_loss(create_mesh(4, 2), query, document, row_chunk_size=3)


# ----------------------------------------------------------------------------------------------
# Memory: the sharded program never holds a [B, B] buffer.


def _largest_hlo_array(hlo_text):
  """Element count of the largest array shape written anywhere in an HLO module's text."""
  sizes = [int(np.prod([int(n) for n in dims.split(",")]))
           for dims in re.findall(r"[a-z]+\d*\[(\d+(?:,\d+)+)\]", hlo_text)]
  return max(sizes, default=0)


def test_sharded_program_holds_no_global_square_buffer():
  batch, dim, num_negatives = 4096, 16, 1
  square_bytes = batch * batch * 4
  local_batch, row_chunk = batch // 8, 64
  mesh = create_mesh(8, 1)
  kwargs = dict(same_tower_negatives=True, bidirectional=True)

  def spec(shape, *partition):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*partition)))

  sharded_args = (spec((batch, dim), "data", None), spec((batch, dim), "data", None),
                  spec((batch, num_negatives, dim), "data", None, None), spec(()))
  global_args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in sharded_args)

  def compile_grad(loss_fn, args):
    grad_fn = jax.value_and_grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 2, 3))
    return jax.jit(grad_fn).lower(*args).compile()

  # Memory numbers must be those of the optimised program the trainer would run.
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    sharded = compile_grad(
        lambda q, d, n, t: losses.sharded_contrastive_loss(mesh, q, d, n, temperature=t,
                                                           **kwargs), sharded_args)
    global_view = compile_grad(
        lambda q, d, n, t: losses.contrastive_loss(q, d, n, temperature=t, **kwargs), global_args)
    row_chunked = compile_grad(
        lambda q, d, n, t: losses.sharded_contrastive_loss(mesh, q, d, n, temperature=t,
                                                           row_chunk_size=row_chunk, **kwargs),
        sharded_args)
  finally:
    jax.config.update("jax_disable_most_optimizations", True)

  sharded_temp = sharded.memory_analysis().temp_size_in_bytes
  global_temp = global_view.memory_analysis().temp_size_in_bytes
  # The check can fail: the global view does hold [B, B] blocks.
  assert _largest_hlo_array(global_view.as_text()) >= batch * batch
  assert global_temp >= square_bytes
  # Per device only [B / 8, B] blocks: no array anywhere in the program is as large as [B, B],
  # total scratch is below one [B, B] f32 buffer and about 1/8 of the global view's.
  assert _largest_hlo_array(sharded.as_text()) < batch * batch
  assert sharded_temp < square_bytes
  assert sharded_temp < global_temp / 4
  # Row-chunked: no [b_local, B] block either, only [r, B] ones (r = b_local / 8 here). Both
  # sides' blocks and cotangents of one anchor block, ~8 [r, B] f32 arrays, bound the scratch
  # beside the [B, d] gathered embeddings and their cotangents (~8 of those).
  block_bytes, embedding_bytes = row_chunk * batch * 4, batch * dim * 4
  assert _largest_hlo_array(row_chunked.as_text()) < local_batch * batch
  chunked_temp = row_chunked.memory_analysis().temp_size_in_bytes
  assert chunked_temp <= 8 * block_bytes + 8 * embedding_bytes, (chunked_temp, sharded_temp)
  assert chunked_temp < sharded_temp / 5, (chunked_temp, sharded_temp)
