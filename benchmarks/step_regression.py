#!/usr/bin/env python3
"""Dual-encoder train step now vs an earlier commit: step time, FLOPs and bytes, same run.

  JAX_PLATFORMS=cpu python benchmarks/step_regression.py --baseline=82b0427 \
      [--size=tiny] [--batch=64] [--lengths=32,128] [--rounds=7] [--steps_per_round=2]

The baseline commit is extracted (`git archive`) into a temporary directory. One worker process
per tree (PYTHONPATH = that tree) builds the same dual encoder (gin/models/<size>.gin, SDE,
SamToNe, AdamW, the config's default dropout, one CPU device), compiles its jitted train step and
reports XLA's cost analysis (FLOPs, bytes accessed: load-independent). Then the two workers step
alternately, `--steps_per_round` steps each per round, so both see the same machine load; the
ratio now / baseline of each round's seconds per step is reported as median [min-max].

Answers issue 18's "the dual-encoder suite's timings do not regress by more than 10%" for the
step itself (the encoder-decoder work shares the trainer, train_step and t5.py with it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside each tree; written against the API both the baseline and today's code have
# (LossConfig moved from train_step to losses, parse_gin from main to gin_config).
WORKER = r'''
import json, sys, time
import gin, jax, numpy as np
from samtone_jax import optimizers, partitioning, train_step as ts
from samtone_jax.models import config as model_config
try:
  from samtone_jax.losses import LossConfig
except ImportError:
  LossConfig = ts.LossConfig
try:
  from samtone_jax.gin_config import parse_gin
except ImportError:
  from samtone_jax.main import parse_gin

size, batch, lq, lp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
parse_gin([f"models/{size}.gin", "architectures/sde.gin"], [])
config = gin.get_configurable(model_config.DualEncoderConfig)()
gin.clear_config()
mesh = partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
spec = ts.batch_spec(batch, {"queries": lq, "passages": lp})
built = ts.build(config, LossConfig(same_tower_negatives=True),
                 optimizers.OptimizerConfig(name="adamw", warmup_steps=10), mesh, spec)
state = built.init_state(jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
host = {k: rng.integers(2, config.encoder.vocab_size, v.shape).astype(np.int32)
        for k, v in spec.items()}
arrays = ts.as_global_batch(host, built.batch_shardings)
key = jax.random.PRNGKey(1)
cost = {}
try:
  analysis = built.train_step.lower(state, arrays, key).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  cost = {"flops": float(analysis.get("flops", 0)),
          "bytes": float(analysis.get("bytes accessed", 0))}
except Exception as e:  # A baseline whose step cannot be lowered this way still gets timed.
  cost = {"error": repr(e)}
state, metrics = built.train_step(state, arrays, key)
jax.block_until_ready(metrics)
print(json.dumps(cost), flush=True)
for line in sys.stdin:
  steps = int(line)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = built.train_step(state, arrays, key)
  jax.block_until_ready((state, metrics))
  print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / steps}), flush=True)
'''


def start_worker(tree: str, args) -> subprocess.Popen:
  lq, lp = args.lengths.split(",")
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="", SAMTONE_COMPILATION_CACHE_DIR="")
  return subprocess.Popen([sys.executable, "-c", WORKER, args.size, str(args.batch), lq, lp],
                          cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)


def read_json(worker: subprocess.Popen, name: str) -> dict:
  line = worker.stdout.readline()
  if not line:
    raise RuntimeError(f"the {name} worker exited (status {worker.wait()}); see its stderr above")
  return json.loads(line)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline", required=True, help="A commit of this repository.")
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lengths", default="32,128")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps_per_round", type=int, default=2)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    archive = subprocess.run(["git", "-C", REPO, "archive", args.baseline], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    trees = {"baseline": tmp, "now": REPO}
    workers = {}
    cost = {}
    for name, tree in trees.items():  # One compile at a time: compiles are CPU-bound.
      workers[name] = start_worker(tree, args)
      cost[name] = read_json(workers[name], name)
    seconds = {name: [] for name in trees}
    for _ in range(args.rounds):
      for name, worker in workers.items():
        worker.stdin.write(f"{args.steps_per_round}\n")
        worker.stdin.flush()
        seconds[name].append(read_json(worker, name)["seconds_per_step"])
    for worker in workers.values():
      worker.stdin.close()
      worker.wait()

  head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()
  print(f"{args.size}, SDE, SamToNe, batch {args.batch}, lengths {args.lengths}, one CPU device; "
        f"{args.rounds} alternating rounds of {args.steps_per_round} steps; "
        f"baseline {args.baseline} vs now {head}\n")
  print("| tree | GFLOP | GB accessed | s/step median [min-max] |")
  print("| --- | ---: | ---: | ---: |")
  for name in trees:
    s = seconds[name]
    c = cost[name]
    flops = f"{c['flops'] / 1e9:.2f}" if "flops" in c else "n/a"
    gbytes = f"{c['bytes'] / 1e9:.2f}" if "bytes" in c else "n/a"
    print(f"| {name} | {flops} | {gbytes} | {statistics.median(s):.3f} "
          f"[{min(s):.3f}-{max(s):.3f}] |")
  ratios = [n / b for n, b in zip(seconds["now"], seconds["baseline"])]
  print(f"\nnow / baseline seconds per step, per round: median {statistics.median(ratios):.3f} "
        f"[{min(ratios):.3f}-{max(ratios):.3f}] (above 1 = slower now)")


if __name__ == "__main__":
  main()
