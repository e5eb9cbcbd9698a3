"""Models: the T5 encoder, the dual encoder, their frozen configs and public-weight import."""

from samtone_jax.models.config import DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder, l2_normalize, pool, trainable_mask
from samtone_jax.models.t5 import T5Encoder

__all__ = ["DualEncoder", "DualEncoderConfig", "T5Config", "T5Encoder", "l2_normalize", "pool",
           "trainable_mask"]
