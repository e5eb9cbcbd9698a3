"""Train-step throughput and model FLOP utilisation: SamToNe vs in-batch softmax.

  JAX_PLATFORMS=cpu python benchmarks/train_step.py [--sizes tiny,small] [--batches 64,256]
      [--steps 3] [--lengths 32,128]

For each model size (gin/models/<size>.gin, SDE), global batch and loss, the real jitted train step
(`train_step.build`, AdamW) runs on one device after a warm-up step; reported: examples/s,
seconds/step, and MFU = model FLOPs per second / peak, where the peak is a large float32 matmul
timed in the same run on the same device. Model FLOPs of one training step (forward + backward
= 3 x forward) per sequence of length L through an encoder with N non-embedding parameters,
`layers` layers and attention width `inner`: 3 * (2 * N * L + 4 * layers * L^2 * inner); plus the
loss's logits (2 * B * C * P per direction, C candidates), which are tiny.
"""

import argparse
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from samtone_jax import gin_config
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.models import config as model_config


def model_config_of(size: str) -> model_config.DualEncoderConfig:
  gin.clear_config()
  gin_config.parse_gin([f"models/{size}.gin", "architectures/sde.gin"], [])
  config = gin.get_configurable(model_config.DualEncoderConfig)()
  gin.clear_config()
  return config


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """float32 FLOP/s of an n x n x n matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def step_flops(config: model_config.DualEncoderConfig, batch: int, lq: int, lp: int,
               same_tower: bool) -> float:
  enc = config.encoder
  inner = enc.num_heads * enc.d_kv
  mlp_in = 2 if enc.feed_forward_proj == "gated-gelu" else 1
  per_layer = 4 * enc.d_model * inner + (mlp_in + 1) * enc.d_model * enc.d_ff
  n = enc.num_layers * per_layer + enc.d_model * config.projection_dim

  def sequence(length):
    return 2 * n * length + 4 * enc.num_layers * length**2 * inner

  candidates = 2 * batch if same_tower else batch
  loss = 2 * batch * candidates * config.projection_dim
  return 3 * (batch * (sequence(lq) + sequence(lp)) + loss)


def bench(config, batch: int, lq: int, lp: int, same_tower: bool, steps: int) -> dict:
  mesh = partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
  spec = ts.batch_spec(batch, {"queries": lq, "passages": lp})
  built = ts.build(config, losses.LossConfig(same_tower_negatives=same_tower),
                   optimizers.OptimizerConfig(name="adamw", warmup_steps=10), mesh, spec)
  state = built.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  host = {k: rng.integers(2, config.encoder.vocab_size, v.shape).astype(np.int32)
          for k, v in spec.items()}
  arrays = ts.as_global_batch(host, built.batch_shardings)
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  state, metrics = built.train_step(state, arrays, key)  # compile + first step
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = built.train_step(state, arrays, key)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  return {"seconds_per_step": seconds, "examples_per_second": batch / seconds,
          "flops_per_second": step_flops(config, batch, lq, lp, same_tower) / seconds,
          "compile_seconds": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--batches", default="64,256")
  parser.add_argument("--lengths", default="32,128", help="query,passage token lengths")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  lq, lp = (int(x) for x in args.lengths.split(","))
  peak = matmul_peak_flops()
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"{os.cpu_count()} CPUs; float32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"lengths {lq}/{lp}, {args.steps} timed steps after one warm-up\n")
  print("| size | batch | loss | s/step | examples/s | GFLOP/s | MFU |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for size in args.sizes.split(","):
    config = model_config_of(size)
    for batch in (int(b) for b in args.batches.split(",")):
      for name, same_tower in (("in-batch", False), ("SamToNe", True)):
        r = bench(config, batch, lq, lp, same_tower, args.steps)
        print(f"| {size} | {batch} | {name} | {r['seconds_per_step']:.3f} | "
              f"{r['examples_per_second']:.1f} | {r['flops_per_second'] / 1e9:.1f} | "
              f"{r['flops_per_second'] / peak:.1%} |", flush=True)


if __name__ == "__main__":
  main()
