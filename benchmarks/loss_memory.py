"""Per-device memory and step time of the sharded contrastive loss vs its global view.

For each global batch size B the script compiles `jax.value_and_grad` of
  * sharded: `losses.sharded_contrastive_loss` on a (data=8, model=1) mesh of fake CPU devices,
    inputs sharded P('data'); each device holds [B/8, B] logit blocks;
  * global: `losses.contrastive_loss(axis_name=None)` jitted on one device, which holds [B, B];
  * gspmd (memory only): the same global-view function jitted with the inputs sharded P('data'),
    i.e. what XLA's automatic partitioner makes of it without shard_map, for comparison;
and reports per-device bytes from `compiled.memory_analysis()` (temp + arguments) and, where it
fits the time budget, the median wall time of a few steps. The 8 "devices" share this host's CPU
cores, so sharded step times are a CPU proxy, not a TPU forecast; the memory numbers are exact
for the compiled CPU programs.

Usage:
  python benchmarks/loss_memory.py [--dim 768] [--batch_sizes 1024,4096,16384,32768]
      [--max_timed_batch 4096] [--num_negatives 0] [--bidirectional] [--repeats 3]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from samtone_jax import losses  # pylint: disable=g-import-not-at-top
from samtone_jax.partitioning import create_mesh  # pylint: disable=g-import-not-at-top

MIB = 2**20


def _compile(loss_fn, args):
  """Compiled jit(value_and_grad) of `loss_fn(q, d, n, t)[0]` w.r.t. all four arguments."""
  num_args = len(args)
  grad_fn = jax.value_and_grad(lambda *a: loss_fn(*a)[0], argnums=tuple(range(num_args)))
  return jax.jit(grad_fn).lower(*args).compile()


def _device_bytes(compiled) -> int:
  analysis = compiled.memory_analysis()
  return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes


def _median_step_seconds(compiled, args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--batch_sizes", default="1024,4096,16384,32768")
  parser.add_argument("--max_timed_batch", type=int, default=4096,
                      help="larger batches are compiled for memory only (2-core CPU budget)")
  parser.add_argument("--num_negatives", type=int, default=0)
  parser.add_argument("--bidirectional", action="store_true")
  parser.add_argument("--no_same_tower_negatives", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  flags = parser.parse_args()

  mesh = create_mesh(data=8, model=1)
  kwargs = dict(same_tower_negatives=not flags.no_same_tower_negatives,
                bidirectional=flags.bidirectional)

  def sharded_loss(q, d, n, t):
    return losses.sharded_contrastive_loss(mesh, q, d, n, temperature=t, **kwargs)

  def global_loss(q, d, n, t):
    return losses.contrastive_loss(q, d, n, temperature=t, **kwargs)

  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, dim={flags.dim}, "
        f"hard negatives/query={flags.num_negatives}, {kwargs}")
  header = ("| B_global | sharded MiB/device | global MiB | sharded/global | gspmd MiB/device "
            "| sharded step s | global step s | sharded/global |")
  print(header)
  print("|---" * 8 + "|")
  skipped = []
  for batch in (int(b) for b in flags.batch_sizes.split(",")):
    negatives_shape = (batch, flags.num_negatives, flags.dim) if flags.num_negatives else None

    def specs(sharded: bool):
      place = lambda *p: NamedSharding(mesh, P(*p)) if sharded else None
      out = [jax.ShapeDtypeStruct((batch, flags.dim), jnp.float32, sharding=place("data", None)),
             jax.ShapeDtypeStruct((batch, flags.dim), jnp.float32, sharding=place("data", None))]
      out.append(None if negatives_shape is None else jax.ShapeDtypeStruct(
          negatives_shape, jnp.float32, sharding=place("data", None, None)))
      out.append(jax.ShapeDtypeStruct((), jnp.float32, sharding=place()))
      return tuple(out)

    compiled_sharded = _compile(sharded_loss, specs(True))
    compiled_global = _compile(global_loss, specs(False))
    compiled_gspmd = _compile(global_loss, specs(True))
    sharded_bytes = _device_bytes(compiled_sharded)
    global_bytes = _device_bytes(compiled_global)
    gspmd_bytes = _device_bytes(compiled_gspmd)

    sharded_time = global_time = None
    if batch <= flags.max_timed_batch:
      rng = np.random.default_rng(0)
      normal = lambda shape: rng.standard_normal(shape, dtype=np.float32)
      unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
      host = [unit(normal((batch, flags.dim))), unit(normal((batch, flags.dim))),
              None if negatives_shape is None else unit(normal(negatives_shape)),
              np.float32(0.01)]
      shardings = [None if s is None else s.sharding for s in specs(True)]
      sharded_args = [None if x is None else jax.device_put(x, s)
                      for x, s in zip(host, shardings)]
      global_args = [None if x is None else jax.device_put(x, jax.devices()[0]) for x in host]
      sharded_time = _median_step_seconds(compiled_sharded, sharded_args, flags.repeats)
      global_time = _median_step_seconds(compiled_global, global_args, flags.repeats)
    else:
      skipped.append(batch)

    fmt_time = lambda t: "skipped" if t is None else f"{t:.3f}"
    time_ratio = "-" if sharded_time is None else f"{sharded_time / global_time:.2f}"
    print(f"| {batch} | {sharded_bytes / MIB:.1f} | {global_bytes / MIB:.1f} | "
          f"{sharded_bytes / global_bytes:.3f} | {gspmd_bytes / MIB:.1f} | "
          f"{fmt_time(sharded_time)} | {fmt_time(global_time)} | {time_ratio} |", flush=True)
  if skipped:
    print(f"Step time not measured for B_global in {skipped}: above --max_timed_batch="
          f"{flags.max_timed_batch}; the global view's value_and_grad needs ~6 [B, B] x d matmuls "
          "(minutes per step on 2 CPU cores at d=768) and several GiB of [B, B] buffers.")


if __name__ == "__main__":
  main()
