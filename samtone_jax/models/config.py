"""Frozen architecture configs for the T5 encoder and the dual encoder.

Every architecture hyper-parameter lives here, in two frozen dataclasses; gin files bind them
(`gin/models/*.gin`, `gin/architectures/*.gin`). Library code never reads gin.
"""

import dataclasses
from typing import Literal

TowerSharing = Literal["sde", "ade", "ade_ste", "ade_fte", "ade_spl"]
TOWER_SHARING_MODES: tuple[str, ...] = ("sde", "ade", "ade_ste", "ade_fte", "ade_spl")
POOLING_MODES: tuple[str, ...] = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """A T5 encoder stack.

  `feed_forward_proj` is "relu" for the original T5 and "gated-gelu" for T5 1.1 (and GTR).
  Names follow Hugging Face's `T5Config` so that imported checkpoints map one to one.
  """

  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 12
  num_heads: int = 12
  feed_forward_proj: Literal["relu", "gated-gelu"] = "gated-gelu"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  # Dropout on the [b, h, l, l] attention weights, the costliest mask (issue 17: about 40% of a
  # tiny CPU step). None: `dropout_rate`, as in T5 (Mesh TensorFlow and HF use one rate
  # everywhere). 0 (or a deterministic pass) takes the fused `jax.nn.dot_product_attention` path.
  # Not part of HF's config.json: import leaves it None, export writes only dropout_rate.
  attention_dropout_rate: float | None = None
  layer_norm_epsilon: float = 1e-6
  # dtype of activations (e.g. "bfloat16" on TPU/GPU); parameters, optimizer state, layer norms,
  # softmax, pooling and the loss stay float32.
  dtype: str = "float32"
  # Recompute each layer's activations in the backward pass (less memory, more compute), saving
  # per `remat_policy`: "full" saves only each layer's input (~1/3 more compute); "dots" also
  # saves the outputs of the weight matmuls (projections and MLP; not the attention einsums,
  # which have batch dimensions) and recomputes the rest.
  remat: bool = False
  remat_policy: Literal["full", "dots"] = "full"
  # Run the layers as one `nn.scan` over stacked parameters (`layers/...` with a leading
  # [num_layers] axis, logical name 'layers') instead of `layers_0 ... layers_{n-1}`: the same
  # function, compiled once per layer body instead of num_layers times (XLA's TPU compiler spends
  # about a CPU-minute per unrolled layer). `t5.stack_layers` / `t5.unstack_layers` convert
  # params; checkpoints.restore_params reads either layout into either.
  scan_layers: bool = False
  # Token embedding lookup as a one-hot [b, l, V] @ [V, d] matmul instead of a gather (t5x's
  # `one_hot` embed, on for TPU experiments): on TPU the matmul runs on the MXU and its gradient
  # is a matmul too, where the gather's gradient is a scatter-add into the [V, d] table. The
  # values are the same (each row of the product has one non-zero term); on CPU the gather is
  # cheaper.
  one_hot_embedding: bool = False

  def __post_init__(self):
    for name in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, name)
      if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"T5Config.{name}={rate}: expected a rate in [0, 1).")

  @property
  def attention_dropout(self) -> float:
    """The rate of dropout on attention weights: `attention_dropout_rate`, or `dropout_rate`."""
    return self.dropout_rate if self.attention_dropout_rate is None else (
        self.attention_dropout_rate)


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """A dual encoder: two T5 towers (shared per `tower_sharing`), pooling, projection, L2 norm.

  tower_sharing (Dong et al. 2022):
    sde:     one tower; every parameter shared.
    ade:     two towers; nothing shared.
    ade_ste: two towers sharing one token embedder.
    ade_fte: two towers sharing one token embedder that is frozen (zero update, no optimizer state).
    ade_spl: two towers sharing only the projection layer.

  identical_tower_init (asymmetric modes only; SDE has one tower): the document tower's
    unshared parameters start as an exact copy of the query tower's, as when one pre-trained
    T5 checkpoint is imported into both towers (the protocol of Dong et al. 2022 and the
    SamToNe paper). Trained from scratch with independent draws the towers start in unrelated
    spaces and ADE barely trains (MRR@10 0.004-0.008 vs SDE 0.37-0.41 on a claim->sentence set,
    issue 16). False restores independent initialisation. Parameters loaded from a checkpoint
    (INITIAL_CHECKPOINT_PATH, resume) replace the initial ones either way.
  """

  encoder: T5Config = T5Config()
  tower_sharing: TowerSharing = "sde"
  pooling: Literal["mean", "first"] = "mean"
  projection_dim: int = 768
  normalize: bool = True
  identical_tower_init: bool = True

  def __post_init__(self):
    if self.tower_sharing not in TOWER_SHARING_MODES:
      raise ValueError(f"tower_sharing={self.tower_sharing!r}; expected one of {TOWER_SHARING_MODES}")
    if self.pooling not in POOLING_MODES:
      raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLING_MODES}")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """A T5 encoder-decoder (the model SKILL trains): the `T5Encoder` stack, a causal decoder with
  cross-attention, and a language-model head.

  `t5` gives both stacks their sizes, feed-forward kind, dropout, dtype and remat / scan options
  (so the `gin/models/*.gin` sizes apply: `EncoderDecoderConfig.t5 = @config.T5Config()`).

  num_decoder_layers: decoder depth; None: `t5.num_layers` (as in every public T5).
  tie_word_embeddings: the logits are the token embedding's transpose applied to the decoder
    output scaled by d_model**-0.5 (original T5); False: a separate `logits_dense` kernel without
    rescaling (T5 1.1). Hugging Face spells False as `tie_word_embeddings: false` (transformers
    4) or `scale_decoder_outputs: false` (transformers 5) in config.json.
  """

  t5: T5Config = T5Config()
  num_decoder_layers: int | None = None
  tie_word_embeddings: bool = False

  @property
  def decoder_layers(self) -> int:
    return self.t5.num_layers if self.num_decoder_layers is None else self.num_decoder_layers
