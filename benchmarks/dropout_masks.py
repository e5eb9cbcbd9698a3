"""Train-step seconds with each way of drawing dropout masks, alternating in one process.

  cd benchmarks && JAX_PLATFORMS=cpu PYTHONPATH=.. python dropout_masks.py [--size tiny]
      [--batch 256] [--rounds 7]

The real jitted train step (`peers.jax_train_step`: SDE, AdamW, in-batch loss, lengths 32/128, the
one CPU device) is built once per variant of `t5.dropout`, and one step of each variant runs in
turn for `--rounds` rounds, so load drifts hit every variant alike. Variants:

  bernoulli32   the previous masks: `jax.random.bernoulli` (32 bits per value) with threefry in
                its partitionable mode, JAX's default (one hash call per value)
  original32    the same bernoulli draw in threefry's original mode (one call per two values)
  partition16   16 bits per value in the partitionable mode
  library       `t5.dropout` as it is: 16 bits per value, original mode
  no_dropout    dropout_rate 0 (the floor: no masks at all)

Reported: seconds per step, median [min-max], and bernoulli32 s / variant s per round (> 1: the
variant is faster).
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import peers  # pylint: disable=g-import-not-at-top  (benchmarks/peers.py)
from samtone_jax import losses
from samtone_jax.models import t5
from train_step import model_config_of

LIBRARY_DROPOUT = t5.dropout


def _bernoulli(x, rate, keys, site):
  site_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, site)
  keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(site_keys)
  return jax.lax.select(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def bernoulli32(x, rate, keys, site):
  if keys is None or rate == 0.0:
    return x
  with jax.threefry_partitionable(True):
    return _bernoulli(x, rate, keys, site)


def original32(x, rate, keys, site):
  if keys is None or rate == 0.0:
    return x
  with jax.threefry_partitionable(False):
    return _bernoulli(x, rate, keys, site)


def partition16(x, rate, keys, site):
  if keys is None or rate == 0.0:
    return x
  threshold = round(rate * 2**16)
  site_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, site)
  with jax.threefry_partitionable(True):
    bits = jax.vmap(lambda key: jax.random.bits(key, x.shape[1:], jnp.uint16))(site_keys)
  scale = jnp.asarray(2**16 / (2**16 - threshold), x.dtype)
  return jax.lax.select(bits >= jnp.uint16(threshold), x * scale, jnp.zeros_like(x))


VARIANTS = {"bernoulli32": bernoulli32, "original32": original32, "partition16": partition16,
            "library": LIBRARY_DROPOUT, "no_dropout": LIBRARY_DROPOUT}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()

  config = model_config_of(args.size)
  rng = np.random.default_rng(0)
  batch = {"queries": rng.integers(2, config.encoder.vocab_size, (args.batch, 32)).astype(np.int32),
           "passages": rng.integers(2, config.encoder.vocab_size,
                                    (args.batch, 128)).astype(np.int32)}
  loss = losses.LossConfig(same_tower_negatives=False, bidirectional=False)
  steps = {}
  for name, dropout in VARIANTS.items():
    t5.dropout = dropout  # traced into this variant's step only (jit traces at the first call)
    variant_config = config
    if name == "no_dropout":
      variant_config = dataclasses.replace(
          config, encoder=dataclasses.replace(config.encoder, dropout_rate=0.0))
    steps[name] = peers.jax_train_step(variant_config, batch, loss)
    steps[name]()  # compile
    steps[name]()
  t5.dropout = LIBRARY_DROPOUT
  seconds = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      seconds[name].append(time.perf_counter() - start)
  print(f"{args.size}, batch {args.batch}, lengths 32/128, dropout "
        f"{config.encoder.dropout_rate}, {args.rounds} alternating rounds\n")
  print("| variant | s/step | bernoulli32 s / variant s |\n| --- | ---: | ---: |")
  for name, times in seconds.items():
    ratios = [b / t for b, t in zip(seconds["bernoulli32"], times)]
    print(f"| {name} | {peers.spread(times, 3)} | {peers.spread(ratios, 2)} |")


if __name__ == "__main__":
  main()
