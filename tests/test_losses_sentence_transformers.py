"""Our contrastive loss equals sentence-transformers' MultipleNegativesRankingLoss, value and gradients.

The peer of `benchmarks/peer_step.py`: in-batch softmax = `directions=("query_to_doc",)`, SamToNe
with query-side same-tower negatives (`bidirectional=False`) = `directions=("query_to_doc",
"query_to_query")` in its joint softmax, at scale = 1 / temperature. Reference: sentence-transformers
6.3's `compute_loss_from_embeddings` in float64 torch, and torch autograd for the gradients. Both
take unnormalised embeddings through an L2 normalisation first (our model's last layer, the peer's
`Normalize` module), so the gradients compared are those the encoders receive.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sentence_transformers.sentence_transformer import losses as st_losses
import torch

from samtone_jax import losses

TEMPERATURE = 0.05


@pytest.mark.parametrize("directions, same_tower", [
    (("query_to_doc",), False),
    (("query_to_doc", "query_to_query"), True),
], ids=["in_batch", "samtone"])
def test_loss_and_gradients_equal_multiple_negatives_ranking_loss(directions, same_tower):
  rng = np.random.default_rng(0)
  q, d = (rng.normal(size=(8, 16)) for _ in range(2))

  peer = st_losses.MultipleNegativesRankingLoss(None, scale=1 / TEMPERATURE, directions=directions,
                                                partition_mode="joint")
  q_t, d_t = (torch.tensor(x, requires_grad=True) for x in (q, d))
  expected = peer.compute_loss_from_embeddings(
      [torch.nn.functional.normalize(x, dim=-1) for x in (q_t, d_t)], None)
  expected.backward()

  def loss(q, d):
    q, d = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, d))
    return losses.contrastive_loss(q, d, temperature=TEMPERATURE, same_tower_negatives=same_tower,
                                   bidirectional=False)[0]

  value, (grad_q, grad_d) = jax.value_and_grad(loss, argnums=(0, 1))(
      jnp.asarray(q, jnp.float32), jnp.asarray(d, jnp.float32))
  np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
  np.testing.assert_allclose(grad_q, q_t.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_d, d_t.grad.numpy(), rtol=1e-4, atol=1e-6)
