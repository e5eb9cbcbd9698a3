"""Identical tower initialisation of the asymmetric dual encoders (issue 16).

Reference: the definition itself. A fresh ADE / ADE-STE / ADE-FTE / ADE-SPL model built the way
training builds it (`train_step.build`, sharded init on a 4x2 mesh, unrolled and scanned layers)
maps one text to the same embedding in both towers; one training step moves the towers apart;
with `identical_tower_init=False` the towers differ from the start; a checkpoint loaded as the
initial parameters replaces them unchanged.
"""

import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax import trainer
from samtone_jax.models import config as model_config
from samtone_jax.models import dual_encoder

ASYMMETRIC = ("ade", "ade_ste", "ade_fte", "ade_spl")
LENGTHS = {"queries": 8, "passages": 8}
BATCH = 8

# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(mode, identical=True, scan_layers=False):
  encoder = model_config.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                  num_heads=4, dropout_rate=0.1, scan_layers=scan_layers)
  return model_config.DualEncoderConfig(encoder=encoder, projection_dim=8, tower_sharing=mode,
                                        identical_tower_init=identical)


def _build(cfg):
  spec = ts.batch_spec(BATCH, LENGTHS)
  built = ts.build(cfg, losses.LossConfig(), optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, warmup_steps=1), partitioning.create_mesh(4, 2), spec)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(1, 64, v.shape).astype(np.int32) for k, v in spec.items()}
  batch["passages"][:, 5:] = 0
  return built, batch


def _tower_embeddings(built, params, tokens):
  """(query-tower, document-tower) embeddings [n, P] of the same token ids [n, L]."""
  model = built.model
  variables = {"params": params["model"]}
  return (np.asarray(model.apply(variables, tokens, method=model.encode_queries)),
          np.asarray(model.apply(variables, tokens, method=model.encode_documents)))


def _unshared_parts(mode, params):
  return [part for part in dual_encoder.PARTS if f"query_{part}" in params["model"]]


# A training step compiles for ~10 s on 2 cores: ADE and ADE-SPL take one (unrolled and
# scanned layers); ADE-STE / ADE-FTE, which differ from ADE only in the shared embedder, are
# checked at initialisation.
@pytest.mark.parametrize("mode,scan_layers,train", [
    ("ade", False, True), ("ade_spl", False, True), ("ade", True, True), ("ade_spl", True, False),
    ("ade_ste", False, False), ("ade_fte", False, False)])
def test_fresh_towers_are_identical_then_train_apart(mode, scan_layers, train):
  built, batch = _build(_config(mode, scan_layers=scan_layers))
  state = built.init_state(jax.random.PRNGKey(0))
  params = state.params["model"]
  assert _unshared_parts(mode, state.params)  # every asymmetric mode has unshared parts
  for part in _unshared_parts(mode, state.params):
    query, document = params[f"query_{part}"], params[f"document_{part}"]
    # Built sharded, each copy laid out like the other.
    jax.tree.map(lambda q, d: q.sharding.is_equivalent_to(d.sharding, q.ndim) or pytest.fail(
        f"{part}: {q.sharding} vs {d.sharding}"), query, document)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(query), jax.device_get(document))
  texts = batch["passages"]  # the same text through both towers
  query_side, document_side = _tower_embeddings(built, state.params, texts)
  np.testing.assert_allclose(query_side, document_side, atol=1e-6, rtol=0)
  assert np.abs(query_side).max() > 0.1  # real embeddings, not zeros
  if not train:
    return
  state, _ = built.train_step(state, ts.as_global_batch(batch, built.batch_shardings),
                              jax.random.PRNGKey(1))
  query_side, document_side = _tower_embeddings(built, state.params, texts)
  assert np.abs(query_side - document_side).max() > 1e-3


@pytest.mark.parametrize("mode", ["ade", "ade_spl"])
def test_independent_init_option(mode):
  built, batch = _build(_config(mode, identical=False))
  state = built.init_state(jax.random.PRNGKey(0))
  for part in _unshared_parts(mode, state.params):
    for q, d in zip(jax.tree.leaves(state.params["model"][f"query_{part}"]),
                    jax.tree.leaves(state.params["model"][f"document_{part}"])):
      if np.std(q) > 0:  # layer-norm scales start at one in both towers
        assert not np.allclose(q, d)
  query_side, document_side = _tower_embeddings(built, state.params, batch["passages"])
  assert np.abs(query_side - document_side).max() > 1e-2


def test_copy_follows_the_tower_sharing_table():
  params = {name: name for name in ("token_embedder", "query_encoder", "document_encoder",
                                    "query_projection", "document_projection")}
  assert dual_encoder.copy_query_tower_to_document("ade_ste", params) == {
      "token_embedder": "token_embedder", "query_encoder": "query_encoder",
      "document_encoder": "query_encoder", "query_projection": "query_projection",
      "document_projection": "query_projection"}
  sde = {"token_embedder": 1, "encoder": 2, "projection": 3}
  assert dual_encoder.copy_query_tower_to_document("sde", sde) == sde


def test_initial_checkpoint_is_loaded_unchanged(tmp_path):
  # A checkpoint whose towers differ (independently initialised) ...
  built, _ = _build(_config("ade", identical=False))
  state = built.init_state(jax.random.PRNGKey(3))
  saved = jax.tree.map(np.array, jax.device_get(state.params))
  manager = checkpoints.create_manager(str(tmp_path / "run"))
  checkpoints.save(manager, 1, state, {"step": 1})
  manager.close()
  # ... is the starting point of a model with identical tower init, value for value.
  cfg = _config("ade", identical=True)
  built_identical, _ = _build(cfg)
  loaded = trainer.initial_state(built_identical, 0, cfg, str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), saved)
  assert not np.array_equal(saved["model"]["query_projection"]["kernel"],
                            saved["model"]["document_projection"]["kernel"])
