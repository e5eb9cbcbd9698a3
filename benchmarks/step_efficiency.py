"""Step efficiency of the issue-17 options, from XLA's compile analysis (and a noisy step time).

  JAX_PLATFORMS=cpu python benchmarks/step_efficiency.py [--size tiny] [--batch 64] \
      [--lengths 32,128] [--steps 3]

For each variant the real jitted train step (`train_step.build`, SDE, SamToNe, AdamW, one device)
is compiled and run: the PRNG implementation of the dropout keys (PRNG_IMPL), attention dropout
on (einsum path) or off (fused `jax.nn.dot_product_attention`), bfloat16 activations, one-hot
embedding lookup. Reported per variant: while-loops in the compiled program (threefry's hash
loops on CPU), XLA's estimate of bytes accessed and FLOPs per step, compile seconds, and the median
step time; each as a ratio to the first variant (threefry, attention dropout = dropout, f32),
measured in the same run. Compile-analysis numbers are exact for the program; times on a shared
machine are not.
"""

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.models import config as model_config

from train_step import model_config_of  # pylint: disable=g-import-not-at-top  (benchmarks/train_step.py)

# (name, prng_impl, T5Config overrides)
VARIANTS = (
    ("threefry, attention dropout 0.1 (einsum)", "threefry2x32", {}),
    ("rbg, attention dropout 0.1 (einsum)", "rbg", {}),
    ("unsafe_rbg, attention dropout 0.1 (einsum)", "unsafe_rbg", {}),
    ("threefry, attention dropout 0 (fused)", "threefry2x32", {"attention_dropout_rate": 0.0}),
    ("rbg, attention dropout 0 (fused)", "rbg", {"attention_dropout_rate": 0.0}),
    ("rbg, fused, bfloat16", "rbg", {"attention_dropout_rate": 0.0, "dtype": "bfloat16"}),
    ("rbg, fused, bfloat16, one-hot", "rbg",
     {"attention_dropout_rate": 0.0, "dtype": "bfloat16", "one_hot_embedding": True}),
)


def measure(config: model_config.DualEncoderConfig, prng_impl: str, batch: int, lq: int,
            lp: int, steps: int) -> dict:
  mesh = partitioning.create_mesh(devices=jax.devices()[:1])
  spec = ts.batch_spec(batch, {"queries": lq, "passages": lp})
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=1,
                                         decay="constant")
  built = ts.build(config, losses.LossConfig(temperature=0.01), optimizer, mesh, spec)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=built.batch_shardings[k])
                    for k, v in spec.items()}
  rng_spec = ts.rng_spec(prng_impl)
  rng_spec = jax.ShapeDtypeStruct(rng_spec.shape, rng_spec.dtype, sharding=built.rng_sharding)
  start = time.perf_counter()
  compiled = built.train_step.lower(built.abstract_state, abstract_batch, rng_spec).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  whiles = compiled.as_text().count(" while(")

  state = built.init_state(ts.init_key(0))
  rng = jax.device_put(ts.base_key(1, prng_impl), built.rng_sharding)
  tokens = np.random.default_rng(0)
  local = {"queries": tokens.integers(1, 1000, (batch, lq)).astype(np.int32),
           "passages": tokens.integers(1, 1000, (batch, lp)).astype(np.int32),
           "query_ids": np.arange(batch, dtype=np.int32),
           "passage_ids": np.arange(batch, dtype=np.int32)}
  global_batch = ts.as_global_batch(local, built.batch_shardings)
  state, metrics = compiled(state, global_batch, rng)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, global_batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"whiles": whiles, "bytes": float(cost.get("bytes accessed", 0.0)),
          "flops": float(cost.get("flops", 0.0)), "compile_s": compile_seconds,
          "step_s": float(np.median(times))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lengths", default="32,128", help="query,passage token lengths")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  lq, lp = map(int, args.lengths.split(","))
  base = model_config_of(args.size)
  base = dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, dropout_rate=0.1))
  print(f"size {args.size}, batch {args.batch}, lengths {lq}/{lp}, SamToNe, AdamW, dropout 0.1, "
        f"{jax.devices()[0].platform}, load average {os.getloadavg()[0]:.1f}", flush=True)
  print("| variant | while-loops | GB accessed | GFLOP | compile s | s/step | "
        "bytes ratio | step ratio |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  reference = None
  for name, prng_impl, overrides in VARIANTS:
    config = dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, **overrides))
    result = measure(config, prng_impl, args.batch, lq, lp, args.steps)
    reference = reference or result
    print(f"| {name} | {result['whiles']} | {result['bytes'] / 1e9:.2f} | "
          f"{result['flops'] / 1e9:.1f} | {result['compile_s']:.1f} | {result['step_s']:.3f} | "
          f"{result['bytes'] / reference['bytes']:.2f} | "
          f"{result['step_s'] / reference['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
