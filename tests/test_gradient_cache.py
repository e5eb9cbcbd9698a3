"""The gradient-cached train step (`ChunkConfig.embedding_chunk_size`) equals the plain step.

The reference is the plain step of `train_step.build` on the same batch and keys (itself checked
against a hand computation in tests/test_train_step.py): after one step the parameters and the
optimizer state must agree to float32 rounding, for every tower-sharing family, with hard
negatives, duplicate ids across chunk and device boundaries, bidirectional SamToNe, a learned
temperature and dropout on, on 1 device and on a (4, 2) mesh. The cases are a covering set, not
the full cross product: each one compiles two steps.
"""

import dataclasses

import jax
import numpy as np
import pytest

from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.models import config as model_config

ENCODER = model_config.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                num_heads=4, dropout_rate=0.1)
LENGTHS = {"queries": 6, "passages": 8}
BATCH = 16
NUM_NEGATIVES = 2
LOSS = losses.LossConfig(temperature=0.05, learn_temperature=True, same_tower_negatives=True,
                         bidirectional=True, use_hard_negatives=True, mask_duplicates=True)
# adam_eps 1e-3 rather than 1e-8: AdamW's first update is lr * g / (|g| + eps), ~lr * sign(g), so
# with a tiny eps a parameter whose gradient is float32 noise (~1e-8) moves by an arbitrary
# fraction of a step in either step; with eps 1e-3 the update is smooth in g and the parameters
# after the step compare as tightly as the gradients do.
OPTIMIZER = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=2,
                                       decay="constant", grad_clip_norm=1.0, weight_decay=0.01,
                                       adam_eps=1e-3)

# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  spec = ts.batch_spec(BATCH, LENGTHS, num_negatives=NUM_NEGATIVES)
  batch = {}
  for name, shape in spec.items():
    if name in ("query_ids", "passage_ids"):
      continue
    tokens = rng.integers(1, ENCODER.vocab_size, shape.shape).astype(np.int32)
    # Padding tails of random length, so that pooling masks differ between rows.
    lengths = rng.integers(2, shape.shape[-1] + 1, shape.shape[:-1])
    tokens[np.arange(shape.shape[-1]) >= lengths[..., None]] = 0
    batch[name] = tokens
  # Duplicates whose rows sit in different chunks (rows 1|2 with chunks of 2, 3|4 with chunks of
  # 4) and on different devices (3|4 and 7|12 on a data axis of 4).
  batch["query_ids"] = np.arange(BATCH, dtype=np.int32)
  batch["query_ids"][[2, 4, 12]] = batch["query_ids"][[1, 3, 7]]
  batch["passage_ids"] = np.arange(BATCH, dtype=np.int32) + 100
  batch["passage_ids"][[6, 12]] = batch["passage_ids"][[5, 11]]
  return batch


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _one_step(model, mesh, chunks, batch):
  spec = ts.batch_spec(BATCH, LENGTHS, num_negatives=NUM_NEGATIVES)
  built = ts.build(model, LOSS, OPTIMIZER, mesh, spec, chunks)
  state = built.init_state(jax.random.PRNGKey(0))
  state, metrics = built.train_step(state, ts.as_global_batch(batch, built.batch_shardings),
                                    jax.random.PRNGKey(3))
  return _host(state), _host(metrics)


# (tower sharing, mesh (data, model), encoder chunk per device, loss chunk, encoder changes).
CASES = [
    ("sde", (4, 2), 2, 2, dict(scan_layers=True, remat=True, num_layers=2)),
    ("ade", (1, 1), 4, 0, {}),
    ("ade_spl", (4, 2), 1, 0, {}),
    ("ade_fte", (1, 1), 8, 4, {}),
]


@pytest.mark.parametrize("sharing, mesh_shape, embedding_chunk, loss_chunk, encoder_changes",
                         CASES, ids=[c[0] for c in CASES])
def test_cached_step_equals_plain_step(sharing, mesh_shape, embedding_chunk, loss_chunk,
                                       encoder_changes):
  model = model_config.DualEncoderConfig(
      encoder=dataclasses.replace(ENCODER, **encoder_changes), projection_dim=8,
      tower_sharing=sharing)
  devices = jax.devices()[:mesh_shape[0] * mesh_shape[1]]
  mesh = partitioning.create_mesh(*mesh_shape, devices=devices)
  batch = _batch()
  plain_state, plain_metrics = _one_step(model, mesh, ts.ChunkConfig(), batch)
  cached_state, cached_metrics = _one_step(
      model, mesh, ts.ChunkConfig(embedding_chunk_size=embedding_chunk,
                                  loss_chunk_size=loss_chunk), batch)

  assert set(cached_metrics) == set(plain_metrics)
  for name, value in plain_metrics.items():
    np.testing.assert_allclose(cached_metrics[name], value, rtol=1e-5, err_msg=name)
  # The learned temperature moved (its gradient went through the cached loss).
  assert cached_state.params["loss"]["log_temperature"] != np.log(np.float32(0.05))
  # Parameters and optimizer state. Encoding 16 rows at once or in chunks sums in a different
  # order, so gradients differ by float32 noise (~1e-6 of each leaf's largest entry, amplified by
  # 1 / temperature); as in tests/test_losses.py, moments are compared relative to their leaf's
  # scale, parameters (~0.1-0.5, moved by ~5e-3) with atol 1e-6.
  assert jax.tree.structure(cached_state.opt_state) == jax.tree.structure(plain_state.opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5 * np.abs(b).max()),
               cached_state.opt_state, plain_state.opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               cached_state.params, plain_state.params)


def test_dropout_masks_follow_the_example_not_the_chunk():
  """The reason the cached step can match: encoding rows in chunks with their global rows draws
  the masks of encoding them at once (and a different key draws different masks)."""
  from samtone_jax.models import dual_encoder  # pylint: disable=g-import-not-at-top
  model = dual_encoder.DualEncoder(model_config.DualEncoderConfig(
      encoder=dataclasses.replace(ENCODER, dropout_rate=0.3), projection_dim=8))
  batch = _batch()
  params = model.init(jax.random.PRNGKey(0), batch["queries"][:1], batch["passages"][:1])
  args = (batch["queries"], batch["passages"], batch["negatives"])

  @jax.jit
  def apply(queries, passages, negatives, rows, key):
    return model.apply(params, queries, passages, negatives, deterministic=False,
                       example_rows=rows, rngs={"dropout": jax.random.PRNGKey(key)})

  def encode(rows, key):
    return apply(*(a[rows] for a in args), rows, key)

  whole = encode(np.arange(BATCH), 1)
  halves = [encode(np.arange(BATCH)[i::2], 1) for i in (1, 0)]  # odd rows first
  # Equal up to the float32 rounding of a different batch shape (another mask would move
  # embeddings by ~0.1).
  for whole_part, odd, even in zip(whole, *halves):
    np.testing.assert_allclose(np.asarray(odd), np.asarray(whole_part)[1::2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(even), np.asarray(whole_part)[0::2], atol=1e-6)
  assert not np.allclose(np.asarray(encode(np.arange(BATCH), 2)[0]), np.asarray(whole[0]))


def test_chunk_that_does_not_divide_the_device_batch_is_refused():
  model = model_config.DualEncoderConfig(encoder=ENCODER, projection_dim=8)
  spec = ts.batch_spec(BATCH, LENGTHS, num_negatives=NUM_NEGATIVES)
  mesh = partitioning.create_mesh(4, 2)
  # 16 examples over 4 data shards: 4 per device.
  with pytest.raises(ValueError, match=r"embedding_chunk_size=3 \(EMBEDDING_CHUNK_SIZE\) does "
                                       r"not divide the 4 examples per device"):
    ts.build(model, LOSS, OPTIMIZER, mesh, spec, ts.ChunkConfig(embedding_chunk_size=3))
  with pytest.raises(ValueError, match=r"loss_chunk_size=3 \(LOSS_CHUNK_SIZE\) does not divide "
                                       r"the 4 examples"):
    ts.build(model, LOSS, OPTIMIZER, mesh, spec, ts.ChunkConfig(loss_chunk_size=3))
  with pytest.raises(ValueError, match="must be >= 0"):
    ts.ChunkConfig(embedding_chunk_size=-1)


# ----------------------------------------------------------------------------------------------
# Memory: the cached program's temporaries do not grow with the batch beyond the loss's buffers.


def test_cached_step_temporaries_grow_only_by_embedding_and_loss_block_buffers():
  """Compiles the tiny model's step (gin/models/tiny.gin's shape) at B = 512 and 4096 on 8
  devices, c = r = 64.

  Formula: per device, going from B1 to B2 the temporaries may grow by at most
    (B2 - B1) * 4 bytes * (E * P + K * r)  +  (b2 - b1) * 4 bytes * T * (Lq + Lp)
  with P the embedding size, E = 8 [B, P] f32 buffers (the gathered queries and documents of
  both loss sides and their cotangents), K = 8 [r, B] f32 loss blocks (cross- and same-tower
  logits of both sides, and their cotangents), and T = 2 copies of the per-device tokens
  (b = B / 8 rows, re-laid out into chunks). Nothing proportional to b * L * d_model (encoder
  activations) or b * B (unchunked logits) may appear. The plain step at B2 is compiled too: its
  growth is ~100x this bound, so the check can fail.
  """
  encoder = model_config.T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                  num_heads=4)
  model = model_config.DualEncoderConfig(encoder=encoder, projection_dim=64)
  loss = losses.LossConfig(same_tower_negatives=True, bidirectional=True)
  optimizer = optimizers.OptimizerConfig(name="adafactor")
  mesh = partitioning.create_mesh(8, 1)
  lengths = {"queries": 16, "passages": 64}
  chunk = rows = 64

  def temporaries(batch_size, chunks):
    spec = ts.batch_spec(batch_size, lengths)
    built = ts.build(model, loss, optimizer, mesh, spec, chunks)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=built.batch_shardings[k])
             for k, v in spec.items()}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=built.rng_sharding)
    compiled = built.train_step.lower(built.abstract_state, batch, rng).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = 512, 4096
  cached = ts.ChunkConfig(embedding_chunk_size=chunk, loss_chunk_size=rows)
  # Memory numbers must be those of the optimised program the trainer would run.
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    cached_small = temporaries(small, cached)
    cached_large = temporaries(large, cached)
    plain_large = temporaries(large, ts.ChunkConfig())
  finally:
    jax.config.update("jax_disable_most_optimizations", True)

  growth_bound = ((large - small) * 4 * (8 * model.projection_dim + 8 * rows)
                  + (large - small) // 8 * 4 * 2 * sum(lengths.values()))
  growth = cached_large - cached_small
  assert growth <= growth_bound, (growth, growth_bound)
  assert plain_large - cached_small > 20 * growth_bound, (plain_large, cached_small)
