"""Input pipeline throughput (examples/s) vs the train step's consumption.

Builds synthetic MS MARCO-format training triples of realistic length (queries ~6 words, passages
~56 words, the means of the real files) from the demo corpus's words in a temp dir, registers
"msmarco_passage_train" on them with the demo SentencePiece vocabulary, and times
`pipeline.get_train_iterator` (lengths 64/256, one hard negative, i.e. three texts tokenised per
example) on at most 2 CPU cores. If `samtone_jax.train_step` is importable it also times the
train step of the tiny and small models on this machine's JAX backend with a batch taken from the
pipeline, and prints pipeline examples/s divided by step examples/s (> 1: the input keeps up).

  JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py [--examples 20000] [--batch_size 128]
"""

import argparse
import gzip
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # pylint: disable=g-import-not-at-top
import seqio  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from samtone_jax.tasks import msmarco  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import pipeline  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top

LENGTHS = {"queries": 64, "passages": 256}
QUERY_WORDS, PASSAGE_WORDS = 6.0, 56.0  # MS MARCO passage means (Nguyen et al. 2016 stats)


def limit_to_cores(num_cores: int) -> int:
  """Pins this process (and TF's thread pools) to `num_cores` CPUs; returns the count used."""
  cpus = sorted(os.sched_getaffinity(0))[:num_cores]
  os.sched_setaffinity(0, cpus)
  tf.config.threading.set_inter_op_parallelism_threads(len(cpus))
  tf.config.threading.set_intra_op_parallelism_threads(len(cpus))
  return len(cpus)


def write_synthetic_msmarco(directory: str, num_examples: int, seed: int = 0) -> None:
  """triples.train.small.tsv with demo-corpus words at MS MARCO's length distribution."""
  with gzip.open(os.path.join(vocab.DEMO_DATA_DIR, "corpus.jsonl.gz"), "rt") as f:
    words = np.array([w for line in f for w in json.loads(line)["text"].split()])
  rng = np.random.default_rng(seed)
  text = lambda mean: " ".join(rng.choice(words, size=max(1, int(rng.poisson(mean)))))
  with open(os.path.join(directory, msmarco.TEXT_TRIPLES), "w", encoding="utf-8") as f:
    for _ in range(num_examples):
      f.write(f"{text(QUERY_WORDS)}\t{text(PASSAGE_WORDS)}\t{text(PASSAGE_WORDS)}\n")


def time_pipeline(batch_size: int, num_batches: int) -> tuple[float, dict[str, np.ndarray]]:
  iterator = pipeline.get_train_iterator(msmarco.TRAIN_TASK, LENGTHS, batch_size, seed=0,
                                         shard_info=seqio.ShardInfo(0, 1))
  for _ in range(5):  # warm-up: graph building, shuffle buffer fill
    batch = next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return batch_size * num_batches / (time.perf_counter() - start), batch


def time_train_step(size: str, batch: dict[str, np.ndarray], batch_size: int, steps: int
                    ) -> float:
  """Examples/s of the real jitted train step for model `size` ("tiny" or "small")."""
  import jax  # pylint: disable=g-import-not-at-top
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  from samtone_jax import optimizers  # pylint: disable=g-import-not-at-top
  from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
  from samtone_jax import train_step  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import config  # pylint: disable=g-import-not-at-top

  encoders = {  # as gin/models/{tiny,small}.gin
      "tiny": config.T5Config(d_model=64, d_ff=128, num_heads=4, num_layers=2, d_kv=16),
      "small": config.T5Config(d_model=512, d_ff=1024, num_heads=6, num_layers=8, d_kv=64),
  }
  model_config = config.DualEncoderConfig(encoder=encoders[size],
                                          projection_dim=64 if size == "tiny" else 768)
  local = {k: v[:batch_size] for k, v in batch.items()}
  mesh = partitioning.create_mesh()
  spec = train_step.batch_spec(batch_size, LENGTHS, num_negatives=local["negatives"].shape[1])
  built = train_step.build(model_config, losses.LossConfig(use_hard_negatives=True),
                           optimizers.OptimizerConfig(), mesh, spec)
  state = built.init_state(jax.random.PRNGKey(0))
  global_batch = train_step.as_global_batch(local, built.batch_shardings)
  rng = jax.random.PRNGKey(1)
  state, metrics = built.train_step(state, global_batch, rng)  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = built.train_step(state, global_batch, rng)
  jax.block_until_ready(metrics)
  return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=20_000)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_batches", type=int, default=60)
  parser.add_argument("--cores", type=int, default=2)
  parser.add_argument("--step_batch_sizes", default="tiny=32,small=8",
                      help="train-step batch per model size (CPU steps are slow); '' skips")
  args = parser.parse_args()
  cores = limit_to_cores(args.cores)
  with tempfile.TemporaryDirectory() as directory:
    write_synthetic_msmarco(directory, args.examples)
    msmarco.register(directory, vocabulary=vocab.demo_vocabulary())
    examples_per_s, batch = time_pipeline(args.batch_size, args.num_batches)
  nonpad = {k: float((batch[k] > 0).sum(-1).mean()) for k in ("queries", "passages")}
  print(f"input pipeline ({cores} cores, lengths {LENGTHS['queries']}/{LENGTHS['passages']}, "
        f"1 hard negative, batch {args.batch_size}): {examples_per_s:,.0f} examples/s "
        f"(mean tokens: query {nonpad['queries']:.1f}, passage {nonpad['passages']:.1f})")
  if not args.step_batch_sizes:
    return
  try:
    import samtone_jax.train_step  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"samtone_jax.train_step not importable ({e}); pipeline number only.")
    return
  import jax  # pylint: disable=g-import-not-at-top
  for item in args.step_batch_sizes.split(","):
    size, step_batch = item.split("=")
    step_rate = time_train_step(size, batch, int(step_batch), steps=3)
    print(f"train step {size} on {jax.devices()[0].platform} x{jax.device_count()} "
          f"(batch {step_batch}): {step_rate:,.1f} examples/s; "
          f"pipeline / step = {examples_per_s / step_rate:,.1f}")


if __name__ == "__main__":
  main()
