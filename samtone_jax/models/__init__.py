"""Models: the T5 encoder, the dual encoder, the T5 encoder-decoder, their frozen configs and
public-weight import."""

from samtone_jax.models.config import DualEncoderConfig, EncoderDecoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder, l2_normalize, pool, trainable_mask
from samtone_jax.models.encoder_decoder import EncoderDecoder
from samtone_jax.models.hf_import import (dual_encoder_params, import_sentence_transformers,
                                          import_t5_encoder, import_t5_encoder_decoder,
                                          t5_config_from_hf)
from samtone_jax.models.t5 import T5Encoder

__all__ = ["DualEncoder", "DualEncoderConfig", "EncoderDecoder", "EncoderDecoderConfig",
           "T5Config", "T5Encoder", "dual_encoder_params", "import_sentence_transformers",
           "import_t5_encoder", "import_t5_encoder_decoder", "l2_normalize", "pool",
           "t5_config_from_hf", "trainable_mask"]
