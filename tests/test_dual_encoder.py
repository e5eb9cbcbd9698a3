"""Dual encoder: gin model files, tower sharing, frozen embedder, pooling, 4x2-mesh sharding.

References: published T5 / GTR dimensions; gradients of each tower computed separately (a shared
parameter's gradient is the sum over towers); numpy pooling; the 1-device result for the sharded
forward and backward pass.
"""

import functools
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samtone_jax import partitioning
from samtone_jax.models import config as config_lib
from samtone_jax.models.config import TOWER_SHARING_MODES, DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder, trainable_mask
from samtone_jax.models.t5 import T5Encoder

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"

# (d_model, d_ff, num_heads, num_layers, d_kv, feed_forward_proj): GTR = T5 1.1 encoders
# (Ni et al. 2021, Table 1 of "Large Dual Encoders Are Generalizable Retrievers"; HF
# google/t5-v1_1-*), original T5 from Raffel et al. 2020 (HF t5-small, t5-base).
PUBLISHED = {
    "small": (512, 1024, 6, 8, 64, "gated-gelu"),
    "base": (768, 2048, 12, 12, 64, "gated-gelu"),
    "large": (1024, 2816, 16, 24, 64, "gated-gelu"),
    "xl": (2048, 5120, 32, 24, 64, "gated-gelu"),
    "xxl": (4096, 10240, 64, 24, 64, "gated-gelu"),
    "t5_original_small": (512, 2048, 8, 6, 64, "relu"),
    "t5_original_base": (768, 3072, 12, 12, 64, "relu"),
    "tiny": (64, 128, 4, 2, 16, "gated-gelu"),
}

TINY = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                dropout_rate=0.1)


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _gin_config(*files: str) -> DualEncoderConfig:
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(GIN_DIR / f) for f in files], [])
    return gin.get_configurable(config_lib.DualEncoderConfig)()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_model_gin_files_give_published_dims(size):
  cfg = _gin_config(f"models/{size}.gin")
  d_model, d_ff, heads, layers, d_kv, ff = PUBLISHED[size]
  enc = cfg.encoder
  assert (enc.d_model, enc.d_ff, enc.num_heads, enc.num_layers, enc.d_kv,
          enc.feed_forward_proj) == (d_model, d_ff, heads, layers, d_kv, ff)
  assert (enc.vocab_size, enc.relative_attention_num_buckets,
          enc.relative_attention_max_distance) == (32128, 32, 128)
  assert cfg.projection_dim == (64 if size == "tiny" else 768)  # GTR: 768 at every size.
  assert (cfg.tower_sharing, cfg.pooling, cfg.normalize) == ("sde", "mean", True)


@pytest.mark.parametrize("mode", TOWER_SHARING_MODES)
def test_architecture_gin_files(mode):
  cfg = _gin_config("models/base.gin", f"architectures/{mode}.gin")
  assert cfg.tower_sharing == mode and cfg.encoder.d_model == 768


def _batch(seed=0, b=3, lq=5, lp=7, n=2):
  rng = np.random.default_rng(seed)
  q = rng.integers(1, TINY.vocab_size, (b, lq)).astype(np.int32)
  p = rng.integers(1, TINY.vocab_size, (b, lp)).astype(np.int32)
  neg = rng.integers(1, TINY.vocab_size, (b, n, lp)).astype(np.int32)
  q[1, 3:] = 0
  p[2, 4:] = 0
  neg[0, 1, 2:] = 0
  return jnp.asarray(q), jnp.asarray(p), jnp.asarray(neg)


@functools.lru_cache(maxsize=None)
def _init(mode, pooling="mean", normalize=True, identical_tower_init=True):
  """(config, module, params) of a tiny dual encoder; cached: params are immutable arrays."""
  cfg = DualEncoderConfig(encoder=TINY, tower_sharing=mode, projection_dim=12, pooling=pooling,
                          normalize=normalize, identical_tower_init=identical_tower_init)
  module = DualEncoder(cfg)
  q, p, neg = _batch()
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), q, p, neg)["params"])
  return cfg, module, params


EXPECTED_TOP_LEVEL = {
    "sde": {"token_embedder", "encoder", "projection"},
    "ade": {"query_token_embedder", "document_token_embedder", "query_encoder",
            "document_encoder", "query_projection", "document_projection"},
    "ade_ste": {"token_embedder", "query_encoder", "document_encoder", "query_projection",
                "document_projection"},
    "ade_fte": {"token_embedder", "query_encoder", "document_encoder", "query_projection",
                "document_projection"},
    "ade_spl": {"query_token_embedder", "document_token_embedder", "query_encoder",
                "document_encoder", "projection"},
}
SHARED = {"sde": ["token_embedder", "encoder", "projection"], "ade": [],
          "ade_ste": ["token_embedder"], "ade_fte": ["token_embedder"], "ade_spl": ["projection"]}


def _tower_losses(module, q, p):
  """Separate scalar functions of the query tower and of the document tower."""
  def query_loss(params):
    e = module.apply({"params": params}, q, method=module.encode_queries)
    return jnp.sum(jnp.sin(3.0 * e))

  def document_loss(params):
    e = module.apply({"params": params}, p, method=module.encode_documents)
    return jnp.sum(jnp.cos(2.0 * e))

  return query_loss, document_loss


@pytest.mark.parametrize("mode", TOWER_SHARING_MODES)
def test_tower_sharing_params_and_gradients(mode):
  cfg, module, params = _init(mode)
  assert set(params) == EXPECTED_TOP_LEVEL[mode]
  encoder_names = ["encoder"] if mode == "sde" else ["query_encoder", "document_encoder"]
  for name in encoder_names:  # Encoders never hold the embedder: it is a top-level entry.
    assert set(params[name]) == {"relpos_bias", "layers_0", "layers_1", "encoder_norm"}
  q, p, _ = _batch()
  query_loss, document_loss = _tower_losses(module, q, p)
  g_query, g_document, g_both = jax.jit(lambda x: (
      jax.grad(query_loss)(x), jax.grad(document_loss)(x),
      jax.grad(lambda y: query_loss(y) + document_loss(y))(x)))(params)

  def norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))

  for name in SHARED[mode]:
    if mode == "ade_fte":
      continue  # Frozen: no gradient at all (test_frozen_token_embedder).
    # One array used by both towers: each tower contributes, and the total is their sum.
    assert norm(g_query[name]) > 0 and norm(g_document[name]) > 0
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b + c, rtol=1e-5, atol=1e-6),
                 g_both[name], g_query[name], g_document[name])
  for name in params:
    if name.startswith("query_"):
      assert norm(g_document[name]) == 0 and norm(g_query[name]) > 0
    if name.startswith("document_"):
      assert norm(g_query[name]) == 0 and norm(g_document[name]) > 0


@pytest.mark.parametrize("mode", ["ade", "ade_ste", "ade_fte", "ade_spl"])
def test_asymmetric_towers_are_initialised_independently(mode):
  # identical_tower_init=True (the default) is tests/test_tower_init.py.
  _, module, params = _init(mode, identical_tower_init=False)
  for part in ("token_embedder", "encoder", "projection"):
    if f"query_{part}" in params:
      leaves_q = jax.tree.leaves(params[f"query_{part}"])
      leaves_d = jax.tree.leaves(params[f"document_{part}"])
      assert all(not np.allclose(a, b) for a, b in zip(leaves_q, leaves_d) if a.std() > 0)
  q, _, _ = _batch()
  # Different towers: the same tokens get different embeddings.
  eq = module.apply({"params": params}, q, method=module.encode_queries)
  ed = module.apply({"params": params}, q, method=module.encode_documents)
  assert not np.allclose(eq, ed, atol=1e-3)


def test_sde_towers_are_one_function():
  _, module, params = _init("sde")
  q, _, _ = _batch()
  np.testing.assert_array_equal(module.apply({"params": params}, q, method=module.encode_queries),
                                module.apply({"params": params}, q,
                                             method=module.encode_documents))


def test_frozen_token_embedder():
  cfg, module, params = _init("ade_fte")
  mask = trainable_mask(cfg, params)
  assert jax.tree.leaves(mask["token_embedder"]) == [False]
  assert all(jax.tree.leaves({k: v for k, v in mask.items() if k != "token_embedder"}))
  q, p, neg = _batch()

  def loss(x):
    eq, ep, en = module.apply({"params": x}, q, p, neg)
    return -jnp.sum(eq * ep) + jnp.sum(jnp.einsum("bd,bnd->bn", eq, en) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  np.testing.assert_array_equal(grads["token_embedder"]["embedding"], 0.0)
  # AdamW's decoupled weight decay would move a zero-gradient parameter: the mask stops it.
  labels = jax.tree.map(lambda m: "trainable" if m else "frozen", mask)
  tx = optax.multi_transform({"trainable": optax.adamw(1e-2, weight_decay=0.1),
                              "frozen": optax.set_to_zero()}, labels)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new_params["token_embedder"]["embedding"],
                                params["token_embedder"]["embedding"])
  assert not np.allclose(new_params["query_encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                         params["query_encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  # No optimizer state of the embedder's size: Adam's moments exist for every other parameter.
  state_sizes = sorted(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim)
  param_sizes = sorted(x.size for k, v in params.items() if k != "token_embedder"
                       for x in jax.tree.leaves(v))
  assert state_sizes == sorted(param_sizes * 2)
  # Other modes train everything.
  for mode in ("sde", "ade", "ade_ste", "ade_spl"):
    cfg_m, module_m, _ = _init(mode)
    shapes = jax.eval_shape(module_m.init, jax.random.PRNGKey(0), q, p)["params"]
    assert all(jax.tree.leaves(trainable_mask(cfg_m, nn.meta.unbox(shapes))))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("first", False)])
def test_pooling_projection_normalisation(pooling, normalize):
  cfg, module, params = _init("sde", pooling, normalize)
  q, p, neg = _batch()
  hidden = np.asarray(T5Encoder(TINY).apply(
      {"params": {"token_embedder": params["token_embedder"], **params["encoder"]}}, q))
  mask = np.asarray(q != 0, np.float32)[..., None]
  pooled = (hidden * mask).sum(1) / mask.sum(1) if pooling == "mean" else hidden[:, 0]
  expected = pooled @ np.asarray(params["projection"]["kernel"])
  if normalize:
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  eq, ep, en = module.apply({"params": params}, q, p, neg)
  np.testing.assert_allclose(eq, expected, rtol=1e-5, atol=1e-6)
  # Negatives go through the document tower one by one.
  for j in range(neg.shape[1]):
    np.testing.assert_allclose(
        en[:, j], module.apply({"params": params}, neg[:, j], method=module.encode_documents),
        rtol=1e-5, atol=1e-6)
  assert eq.shape == ep.shape == (3, 12) and en.shape == (3, 2, 12)
  assert module.apply({"params": params}, q, p)[2] is None


def test_dropout_only_when_not_deterministic():
  _, module, params = _init("ade")
  q, p, neg = _batch()
  apply = jax.jit(module.apply, static_argnames="deterministic")
  a = apply({"params": params}, q, p, neg)
  b = apply({"params": params}, q, p, neg, deterministic=True)
  c = apply({"params": params}, q, p, neg, deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(1)})
  d = apply({"params": params}, q, p, neg, deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(1)})
  jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(np.testing.assert_array_equal, c, d)
  assert not np.allclose(a[0], c[0], atol=1e-3)


# --- partitioning -----------------------------------------------------------------------------

# What LOGICAL_AXIS_RULES say, written out per parameter (independent of the rules table).
EXPECTED_SPECS = {
    "embedding": ("model", None),
    "rel_embedding": ("model", None),
    "scale": (None,),
    ("attention", "query"): (None, "model"),
    ("attention", "key"): (None, "model"),
    ("attention", "value"): (None, "model"),
    ("attention", "out"): ("model", None),
    ("mlp", "wi_0"): (None, "model"),
    ("mlp", "wi_1"): (None, "model"),
    ("mlp", "wo"): ("model", None),
    "projection": (None, None),
}


def _expected_spec(path) -> tuple:
  keys = [p.key for p in path]
  if keys[-1] in ("embedding", "rel_embedding", "scale"):
    return EXPECTED_SPECS[keys[-1]]
  if keys[0].endswith("projection"):
    return EXPECTED_SPECS["projection"]
  return EXPECTED_SPECS[(keys[-3], keys[-2])]


def _normalise_spec(spec, ndim):
  spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  return spec


@pytest.mark.parametrize("mode", ["sde"])
def test_sharded_forward_backward_matches_single_device(mode):
  enc = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 dropout_rate=0.0)
  cfg = DualEncoderConfig(encoder=enc, tower_sharing=mode, projection_dim=12)
  module = DualEncoder(cfg)
  q, p, neg = _batch(b=8)
  rng = jax.random.PRNGKey(0)

  def loss_fn(params, q, p, neg):
    eq, ep, en = module.apply({"params": params}, q, p, neg)
    logits = jnp.concatenate([eq @ ep.T, jnp.einsum("bd,bnd->bn", eq, en)], axis=1) * 20.0
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

  # Reference: one device, no mesh.
  device = jax.devices()[0]
  with jax.default_device(device):
    ref_params = nn.meta.unbox(jax.jit(module.init)(rng, q, p, neg)["params"])
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(ref_params, q, p, neg)

  mesh = partitioning.create_mesh(data=4, model=2)
  variables, shardings = partitioning.sharded_init(lambda r: module.init(r, q, p, neg), mesh, rng)
  params, param_shardings = variables["params"], shardings["params"]

  # Each parameter lives where the rules put it.
  def check(path, x):
    expected = _normalise_spec(_expected_spec(path), x.ndim)
    assert _normalise_spec(x.sharding.spec, x.ndim) == expected, (path, x.sharding.spec)
    assert x.sharding.mesh.shape == {"data": 4, "model": 2}
  jax.tree_util.tree_map_with_path(check, params)
  embedder = params["token_embedder" if mode == "sde" else "query_token_embedder"]["embedding"]
  assert len(embedder.addressable_shards) == 8
  assert embedder.addressable_shards[0].data.shape == (enc.vocab_size // 2, enc.d_model)
  # Same values as the unsharded init (threefry is partitionable).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, ref_params)

  batch = [jax.device_put(x, partitioning.data_sharding(mesh, x.ndim)) for x in (q, p, neg)]
  with partitioning.mesh_context(mesh):
    step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(partitioning.replicated(mesh),
                                                               param_shardings))
    loss, grads = step(params, *batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, ref_grads)
  assert float(ref_loss) > 0.1 and max(float(jnp.abs(g).max())
                                       for g in jax.tree.leaves(ref_grads)) > 1e-3
