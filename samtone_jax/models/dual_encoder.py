"""The dual encoder: T5 towers (shared per `tower_sharing`), pooling, projection, L2 norm.

Parameter tree (top level of `params`). A shared part is ONE entry used by both towers and has a
plain name; a per-tower part is prefixed `query_` / `document_`:

  sde:      token_embedder, encoder, projection
  ade:      query_token_embedder, document_token_embedder, query_encoder, document_encoder,
            query_projection, document_projection
  ade_ste:  token_embedder, query_encoder, document_encoder, query_projection,
            document_projection
  ade_fte:  as ade_ste; token_embedder is frozen (see `trainable_mask`)
  ade_spl:  query_token_embedder, document_token_embedder, query_encoder, document_encoder,
            projection

  *token_embedder/embedding  [V, d]  ('vocab', 'embed')
  *encoder/...               the `T5Encoder` tree without its embedder (see models/t5.py)
  *projection/kernel         [d, P]  ('embed', 'projection'); no bias (GTR's Dense: bias=False,
                                     identity activation)

Embeddings: pooled hidden states (mean over tokens != 0, or the first token) are cast to
float32, projected, and L2-normalised when `config.normalize` (x / max(|x|, 1e-12), as
sentence-transformers' Normalize).

Dropout (training, `deterministic=False`): every example draws its masks from its own key,
`fold_in(fold_in(dropout_key, tower input), global row)` (see `example_dropout_keys`), so the
masks do not depend on how a batch is split into chunks or devices: encoding rows 0..B-1 at once
or in chunks (passing each chunk's `example_rows`) gives the same embeddings.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from samtone_jax.models.config import DualEncoderConfig
from samtone_jax.models.t5 import Dense, Embed, T5Encoder, fold_in_rows
from samtone_jax.tasks.features import PAD_ID

Array = jax.Array

# Top-level names of the shared token embedder (modes that share it).
TOKEN_EMBEDDER = "token_embedder"
SIDES: tuple[str, ...] = ("query", "document")
PARTS: tuple[str, ...] = (TOKEN_EMBEDDER, "encoder", "projection")
# The one tower-sharing table: which of a tower's three parts each mode shares between the query
# and the document tower. A shared part is one top-level entry named `part`; an unshared part is
# two, `query_<part>` and `document_<part>`. The model, the importer, the exporter and the
# identical initialisation read it through `param_name` / `tower_parameter_names`.
SHARED_PARTS: dict[str, frozenset[str]] = {
    "sde": frozenset(PARTS),
    "ade": frozenset(),
    "ade_ste": frozenset({TOKEN_EMBEDDER}),
    "ade_fte": frozenset({TOKEN_EMBEDDER}),
    "ade_spl": frozenset({"projection"}),
}
# Beside it: the shared parts each mode freezes (zero update, no optimizer state; the model stops
# their gradient). Read by the model and `trainable_mask`.
FROZEN_PARTS: dict[str, frozenset[str]] = {"ade_fte": frozenset({TOKEN_EMBEDDER})}


def param_name(tower_sharing: str, part: str, side: str) -> str:
  """Top-level params name of `part` ("token_embedder", "encoder", "projection") of the `side`
  ("query", "document") tower under `tower_sharing`: `part` if shared, else `<side>_<part>`."""
  if side not in SIDES:
    raise ValueError(f"side={side!r}; expected one of {SIDES}")
  return part if part in SHARED_PARTS[tower_sharing] else f"{side}_{part}"


def tower_parameter_names(tower_sharing: str, side: str) -> dict[str, str]:
  """{part: top-level params name} of one tower, e.g. ("ade_spl", "query") ->
  {"token_embedder": "query_token_embedder", "encoder": "query_encoder",
  "projection": "projection"}."""
  return {part: param_name(tower_sharing, part, side) for part in PARTS}


# Which tower input an example key belongs to (folded into the step's dropout key).
_QUERIES, _PASSAGES, _NEGATIVES = 0, 1, 2


def example_dropout_keys(dropout_key: Array, example_rows: Array, num_negatives: int
                         ) -> tuple[Array, Array, Array]:
  """Per-example dropout keys of the examples at global rows `example_rows`.

  Args:
    dropout_key: the step's dropout key ([] typed key, or raw [2] uint32).
    example_rows: int [b], each example's row in the global batch.
    num_negatives: N hard negatives per example (0: none).

  Returns:
    (queries [b], passages [b], negatives [b, N]) keys (raw keys: a trailing [2]): hard negative k of row r is keyed by
    r * N + k, its row in the flattened [B * N] negatives.
  """
  queries = fold_in_rows(jax.random.fold_in(dropout_key, _QUERIES), example_rows)
  passages = fold_in_rows(jax.random.fold_in(dropout_key, _PASSAGES), example_rows)
  negative_rows = example_rows[:, None] * num_negatives + jnp.arange(num_negatives)[None, :]
  negatives = fold_in_rows(jax.random.fold_in(dropout_key, _NEGATIVES),
                           negative_rows.reshape(-1))
  return queries, passages, negatives.reshape(example_rows.shape[0], num_negatives,
                                             *negatives.shape[1:])


def pool(hidden: Array, tokens: Array, pooling: str) -> Array:
  """Pools token states into one vector per sequence.

  Args:
    hidden: [b, l, d] encoder outputs.
    tokens: int [b, l] token ids; 0 is padding.
    pooling: "mean" (over non-padding tokens; an all-padding row gives zeros) or "first".

  Returns:
    float32 [b, d].
  """
  hidden = hidden.astype(jnp.float32)
  if pooling == "first":
    return hidden[:, 0, :]
  if pooling == "mean":
    mask = (tokens != PAD_ID).astype(jnp.float32)[..., None]
    # The 1e-9 floor is sentence-transformers' clamp; it keeps all-padding rows finite.
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
  raise ValueError(f"pooling={pooling!r}; expected 'mean' or 'first'.")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def copy_query_tower_to_document(tower_sharing: str, params: dict[str, Any]) -> dict[str, Any]:
  """`params` with each unshared document-tower part replaced by the query tower's.

  What importing one pre-trained checkpoint into both towers does (Dong et al. 2022; the
  SamToNe paper's ADE start from one T5 checkpoint): the towers begin as the same function and
  drift apart in training. Leaves may be boxed (`nn.LogicallyPartitioned`); the document part
  takes the query part's boxes, whose logical axis names are the same. Parts absent from
  `params` (e.g. `init` of `encode_queries` alone) are left as they are.

  Args:
    tower_sharing: the mode (see `SHARED_PARTS`).
    params: the top-level `params` collection of a DualEncoder.

  Returns:
    A new dict; `params` is not modified.
  """
  params = dict(params)
  for part in PARTS:
    if part in SHARED_PARTS[tower_sharing]:
      continue
    query, document = f"query_{part}", f"document_{part}"
    if query in params and document in params:
      params[document] = params[query]
  return params


class DualEncoder(nn.Module):
  """Query and document towers over a T5 encoder.

  `init` creates every parameter of both towers (it runs `__call__` on queries and passages).
  With `config.identical_tower_init` (the default) the unshared document-tower parameters are
  then a copy of the query tower's, so a fresh asymmetric model maps a text to the same
  embedding in both towers; every `init` (training, the t5x adapter, `jax.eval_shape`) does it.
  """

  config: DualEncoderConfig

  def setup(self):
    cfg = self.config
    enc = cfg.encoder
    dtype = jnp.dtype(enc.dtype)
    sharing = cfg.tower_sharing
    # ADE-FTE: the shared embedder is frozen; stopping its gradient also saves the scatter-add.
    frozen = TOKEN_EMBEDDER in FROZEN_PARTS.get(sharing, ())

    def new(part, side):
      if part == TOKEN_EMBEDDER:
        return Embed(enc.vocab_size, enc.d_model, dtype, enc.one_hot_embedding)
      if part == "encoder":
        embedder = getattr(self, param_name(sharing, TOKEN_EMBEDDER, side))
        return T5Encoder(enc, token_embedder=embedder, stop_embedding_gradient=frozen)
      return Dense(cfg.projection_dim, ("embed", "projection"),
                   nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                   jnp.float32)

    # Attribute names are the parameter-tree names (see the module docstring); the embedder
    # first, as the encoders use it.
    for part in PARTS:
      if part in SHARED_PARTS[sharing]:
        setattr(self, part, new(part, "query"))
      else:
        for side in SIDES:
          setattr(self, f"{side}_{part}", new(part, side))

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):
    """`flax.linen.Module.init`, then the identical tower initialisation of the config."""
    variables = nn.Module.init(self, rngs, *args, **kwargs)
    if not self.config.identical_tower_init or "params" not in variables:
      return variables
    return {**variables, "params": copy_query_tower_to_document(self.config.tower_sharing,
                                                                variables["params"])}

  def _tower(self, side: str) -> tuple[nn.Module, nn.Module]:
    """(encoder, projection) of the 'query' or 'document' tower; shared ones are the same."""
    names = tower_parameter_names(self.config.tower_sharing, side)
    return getattr(self, names["encoder"]), getattr(self, names["projection"])

  def _encode(self, side: str, tokens: Array, deterministic: bool,
              dropout_keys: Array | None = None) -> Array:
    encoder, projection = self._tower(side)
    hidden = encoder(tokens, deterministic=deterministic, dropout_keys=dropout_keys)
    pooled = pool(hidden, tokens, self.config.pooling)
    pooled = nn.with_logical_constraint(pooled, ("batch", "embed"))
    embeddings = projection(pooled)
    if self.config.normalize:
      embeddings = l2_normalize(embeddings)
    return nn.with_logical_constraint(embeddings, ("batch", "projection"))

  def encode_queries(self, tokens: Array, deterministic: bool = True) -> Array:
    """tokens: int32 [b, l] query token ids (0 = padding) -> float32 [b, projection_dim]."""
    return self._encode("query", tokens, deterministic)

  def encode_documents(self, tokens: Array, deterministic: bool = True) -> Array:
    """tokens: int32 [b, l] document token ids (0 = padding) -> float32 [b, projection_dim]."""
    return self._encode("document", tokens, deterministic)

  def __call__(self, queries: Array, passages: Array, negatives: Array | None = None,
               deterministic: bool = True, example_rows: Array | None = None
               ) -> tuple[Array, Array, Array | None]:
    """Embeds queries, their positive passages and (optionally) hard negatives.

    Args:
      queries: int32 [b, lq].
      passages: int32 [b, lp] positive passages.
      negatives: int32 [b, n, lp] hard negative passages, or None.
      deterministic: disables dropout (needs a 'dropout' rng when False).
      example_rows: int [b], the rows of these examples in the global batch, which key their
        dropout masks (see `example_dropout_keys`); None: rows 0..b-1. A chunk of a batch passes
        its rows to draw the masks the whole batch would.

    Returns:
      (q [b, P], p [b, P], neg [b, n, P] or None), float32.
    """
    keys = (None, None, None)
    if not deterministic:
      rows = jnp.arange(queries.shape[0]) if example_rows is None else example_rows
      keys = example_dropout_keys(self.make_rng("dropout"), rows,
                                  0 if negatives is None else negatives.shape[1])
    q = self._encode("query", queries, deterministic, keys[0])
    p = self._encode("document", passages, deterministic, keys[1])
    neg = None
    if negatives is not None:
      b, n, lp = negatives.shape
      negative_keys = None if deterministic else keys[2].reshape(b * n, *keys[2].shape[2:])
      neg = self._encode("document", negatives.reshape(b * n, lp), deterministic, negative_keys)
      neg = neg.reshape(b, n, -1)
      neg = nn.with_logical_constraint(neg, ("batch", "negatives", "projection"))
    return q, p, neg


def trainable_mask(config: DualEncoderConfig, params: Any) -> Any:
  """Which parameters the optimizer may change: a tree like `params` of Python bools.

  False only for the frozen shared token embedder of ADE-FTE. The model already stops gradients
  into it, but a zero gradient is not a zero update (AdamW's decoupled weight decay, Adafactor's
  ...), so the optimizer must skip it and hold no state for it. Use:

    mask = trainable_mask(config, params)
    labels = jax.tree.map(lambda m: "trainable" if m else "frozen", mask)
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

  (`optax.masked(tx, mask)` alone is NOT enough: it passes masked gradients through unchanged.)

  Args:
    config: the dual encoder config.
    params: the `params` collection (or a tree with the same top-level keys, e.g. abstract
      shapes or the full variables dict {'params': ...}).

  Returns:
    A tree with the structure of `params` and bool leaves.
  """
  frozen = {param_name(config.tower_sharing, part, side)
            for part in FROZEN_PARTS.get(config.tower_sharing, ()) for side in SIDES}
  tree = params["params"] if "params" in params and len(params) == 1 else params

  def mark(path, _):
    return getattr(path[0], "key", None) not in frozen

  mask = jax.tree_util.tree_map_with_path(mark, tree)
  return {"params": mask} if tree is not params else mask
