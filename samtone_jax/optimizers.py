"""Optimizer and learning-rate schedule for training, built from optax.

One frozen `OptimizerConfig` (bound by gin in `gin/runs/*.gin`) describes the optimizer: Adafactor
(T5X's default: factored second moments, update clipping, parameter-scale learning rates) or AdamW,
a linear warmup followed by a constant, linear or reciprocal-square-root decay, and gradient
clipping by global norm. Frozen parameters (ADE-FTE's shared embedder) get a zero update and no
optimizer state.
"""

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")
DECAYS = ("constant", "linear", "rsqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyper-parameters.

  Attributes:
    name: "adafactor" or "adamw".
    learning_rate: peak learning rate, reached at the end of the warmup.
    warmup_steps: linear warmup from 0 to `learning_rate` over this many steps.
    decay: after the warmup: "constant"; "linear" to `end_learning_rate` at `decay_steps`;
      "rsqrt": learning_rate * sqrt(warmup_steps / step) (T5X's schedule).
    decay_steps: the step at which the linear decay reaches `end_learning_rate` (usually
      TRAIN_STEPS).
    end_learning_rate: final learning rate of the linear decay.
    grad_clip_norm: clip gradients to this global norm (None: no clipping).
    weight_decay: decoupled weight decay (AdamW) or Adafactor's `weight_decay_rate`.
    adam_b1, adam_b2, adam_eps: AdamW moments.
    adafactor_decay_rate: Adafactor's second-moment decay exponent (T5X: 0.8).
    adafactor_multiply_by_parameter_scale: scale updates by the parameter RMS (T5X: True).
    adafactor_min_dim_size_to_factor: factor second moments of dims at least this large.
  """

  name: Literal["adafactor", "adamw"] = "adafactor"
  learning_rate: float = 1e-3
  warmup_steps: int = 1000
  decay: Literal["constant", "linear", "rsqrt"] = "linear"
  decay_steps: int = 100_000
  end_learning_rate: float = 0.0
  grad_clip_norm: float | None = 1.0
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  adafactor_multiply_by_parameter_scale: bool = True
  adafactor_min_dim_size_to_factor: int = 128

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.name={self.name!r}; expected one of {OPTIMIZERS}")
    if self.decay not in DECAYS:
      raise ValueError(f"OptimizerConfig.decay={self.decay!r}; expected one of {DECAYS}")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """The learning rate as a function of the (0-based) step count."""
  peak = config.learning_rate
  warmup = config.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # Warmup: step 0 uses peak / warmup, not 0, so that the first step already moves the params.
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    if config.decay == "constant":
      return warm
    if config.decay == "rsqrt":
      return jnp.where(step < warmup, warm,
                       peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1))))
    # Linear decay from the end of warmup to decay_steps, then flat at end_learning_rate.
    span = max(config.decay_steps - warmup, 1)
    frac = jnp.clip((step - warmup) / span, 0.0, 1.0)
    decayed = peak + (config.end_learning_rate - peak) * frac
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def _base_optimizer(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  if config.name == "adafactor":
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=config.adafactor_min_dim_size_to_factor,
        decay_rate=config.adafactor_decay_rate,
        multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
        clipping_threshold=1.0,
        weight_decay_rate=config.weight_decay or None)
  return optax.adamw(learning_rate=schedule, b1=config.adam_b1, b2=config.adam_b2,
                     eps=config.adam_eps, weight_decay=config.weight_decay)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies `inner` to each slice [i] of leaves stacked on a leading layers axis, as if every
  layer were its own parameter (jax.vmap of init and update over axis 0).

  For `T5Config.scan_layers`: Adafactor's factored moments, parameter-scale learning rate and
  update clipping are per-tensor statistics, so a stacked [L, d, f] kernel must not be treated as
  one tensor; with this wrapper a scanned model trains exactly like the unrolled one. The state
  has the structure of `inner`'s, every leaf with a leading [L] axis (counters included).
  """

  def init(params):
    leaves = jax.tree.leaves(params)
    if not leaves:
      return inner.init(params)
    if not all(hasattr(x, "shape") for x in leaves):
      # optax.tree_map_params probes the state structure with a placeholder object; vmap
      # keeps the structure, so the unmapped one is the same.
      return inner.init(params)
    return jax.vmap(inner.init)(params)

  def update(updates, state, params=None):
    if not jax.tree.leaves(updates):
      return inner.update(updates, state, params)
    if params is None:
      return jax.vmap(lambda u, s: inner.update(u, s))(updates, state)
    return jax.vmap(inner.update)(updates, state, params)

  return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, trainable: Any | None = None,
                   stacked: Any | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer.

  Args:
    config: the hyper-parameters.
    trainable: a pytree of bools with the structure of the params (False: frozen), or None (all
      trainable). Frozen leaves get `optax.set_to_zero()`: no state, zero update, and they do not
      count towards the clipping norm.
    stacked: a pytree of bools with the structure of the params (True: a leaf stacked on a
      leading layers axis, `scan_layers`), or None (none). Stacked leaves get the optimizer per
      layer (`per_layer`); the gradient clipping norm stays global.

  Returns:
    (tx, schedule): the transformation and the learning-rate schedule it uses (for logging).
  """
  schedule = learning_rate_schedule(config)
  parts = []
  if config.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  base = _base_optimizer(config, schedule)
  if stacked is not None and any(jax.tree.leaves(stacked)):
    if trainable is not None:
      # Under the frozen/trainable split below, frozen leaves arrive as optax.MaskedNode.
      stacked = jax.tree.map(lambda s, t: s if t else optax.MaskedNode(), stacked, trainable)
    labels = jax.tree.map(lambda s: "stacked" if s else "single", stacked)
    base = optax.multi_transform({"stacked": per_layer(base), "single": base}, labels)
  parts.append(base)
  tx = optax.chain(*parts)
  if trainable is not None and not all(jax.tree.leaves(trainable)):
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
