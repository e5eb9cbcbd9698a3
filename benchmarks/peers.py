"""Shared pieces of the benchmarks that time our train step against sentence-transformers.

Used by `gradient_cache.py` (cached step) and `peer_step.py` (plain step, time to first step).
JAX/samtone_jax and torch/sentence-transformers are imported inside the functions that need them,
so that `peer_step.py`'s time-to-first-step child processes each import only their own side.

The peer model has our dual encoder's shape for one shared tower (SDE): a randomly initialised HF
`T5EncoderModel` with the size's T5 config (same dropout rate, which HF also applies to the
attention weights), mean pooling over non-padding tokens, a bias-free Dense projection, L2
normalisation.
"""

from collections.abc import Callable
import statistics
import time
from typing import Any

import numpy as np


def jax_train_step(config, batch: dict[str, np.ndarray], loss_config,
                   embedding_chunk_size: int = 0) -> Callable[[], None]:
  """A closure running one step of our real jitted train step, the state carried between calls.

  Args:
    config: the `DualEncoderConfig`.
    batch: {"queries": [B, Lq], "passages": [B, Lp]} int32 token ids.
    loss_config: a `losses.LossConfig`.
    embedding_chunk_size: > 0: the gradient-cached step with this EMBEDDING_CHUNK_SIZE.

  Returns:
    `step()`: one train step (AdamW, warm-up 10), blocking until its outputs are ready; the first
    call compiles.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from samtone_jax import optimizers  # pylint: disable=g-import-not-at-top
  from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
  from samtone_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  mesh = partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  built = ts.build(config, loss_config, optimizers.OptimizerConfig(name="adamw", warmup_steps=10),
                   mesh, spec, ts.ChunkConfig(embedding_chunk_size=embedding_chunk_size))
  state = [built.init_state(jax.random.PRNGKey(0))]
  arrays = ts.as_global_batch(batch, built.batch_shardings)
  key = jax.random.PRNGKey(1)

  def step():
    state[0], metrics = built.train_step(state[0], arrays, key)
    jax.block_until_ready((state[0], metrics))

  return step


def sentence_transformer(encoder: Any, projection_dim: int):
  """Our SDE dual encoder's shape as a sentence-transformers model, randomly initialised.

  Args:
    encoder: the T5 shape: anything with our `T5Config`'s field names (vocab_size, d_model, d_kv,
      d_ff, num_layers, num_heads, feed_forward_proj, dropout_rate,
      relative_attention_num_buckets, relative_attention_max_distance).
    projection_dim: the Dense projection's output width.

  Returns:
    A `SentenceTransformer` on CPU in training mode (dropout on).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from sentence_transformers import models as st_models  # pylint: disable=g-import-not-at-top

  hf_config = transformers.T5Config(
      vocab_size=encoder.vocab_size, d_model=encoder.d_model, d_kv=encoder.d_kv,
      d_ff=encoder.d_ff, num_layers=encoder.num_layers, num_heads=encoder.num_heads,
      feed_forward_proj=encoder.feed_forward_proj, dropout_rate=encoder.dropout_rate,
      relative_attention_num_buckets=encoder.relative_attention_num_buckets,
      relative_attention_max_distance=encoder.relative_attention_max_distance)

  class T5Tokens(torch.nn.Module):
    """input_ids / attention_mask -> token_embeddings, as sentence-transformers' Transformer."""

    def __init__(self):
      super().__init__()
      self.encoder = transformers.T5EncoderModel(hf_config)

    def forward(self, features, **_):
      out = self.encoder(input_ids=features["input_ids"],
                         attention_mask=features["attention_mask"])
      features["token_embeddings"] = out.last_hidden_state
      return features

  model = SentenceTransformer(modules=[
      T5Tokens(), st_models.Pooling(encoder.d_model, pooling_mode="mean"),
      st_models.Dense(encoder.d_model, projection_dim, bias=False,
                      activation_function=torch.nn.Identity()),
      st_models.Normalize()], device="cpu")
  model.train()
  return model


def sentence_transformers_train_step(model, loss, batch: dict[str, np.ndarray],
                                     grad_clip_norm: float | None = None) -> Callable[[], None]:
  """A closure running one eager torch step of `loss` (a sentence-transformers loss of `model`).

  Args:
    model: from `sentence_transformer`.
    loss: e.g. `MultipleNegativesRankingLoss(model, ...)`.
    batch: {"queries": [B, Lq], "passages": [B, Lp]} token ids (0 = padding).
    grad_clip_norm: clip the gradients' global norm (what sentence-transformers' Trainer does
      with its default max_grad_norm=1.0, and our OptimizerConfig's default); None: no clipping.

  Returns:
    `step()`: zero_grad, forward, backward, (clip,) AdamW step (lr 1e-4).
  """
  import torch  # pylint: disable=g-import-not-at-top

  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def features(tokens):
    ids = torch.from_numpy(tokens.astype(np.int64))
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}

  inputs = [features(batch["queries"]), features(batch["passages"])]
  labels = torch.zeros(batch["queries"].shape[0])

  def step():
    optimizer.zero_grad()
    value = loss([dict(f) for f in inputs], labels)
    value.backward()
    if grad_clip_norm is not None:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()

  return step


def alternate(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
  """Seconds of each step, run alternately (one of each per round) after one warm-up step each.

  Args:
    steps: {name: step()}; the first call of each is the warm-up (compile) and is not timed.
    repeats: timed rounds.

  Returns:
    {name: [seconds per round]}.
  """
  for step in steps.values():
    step()
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return times


def spread(values: list[float], digits: int = 3) -> str:
  """"median [min-max]" of `values`."""
  return (f"{statistics.median(values):.{digits}f} "
          f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")
