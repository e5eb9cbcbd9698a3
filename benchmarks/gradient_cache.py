"""Gradient-cached vs plain train step: time ratio on one device, and vs sentence-transformers.

  JAX_PLATFORMS=cpu python benchmarks/gradient_cache.py [--size tiny] [--batch 128] [--chunk 32]
      [--lengths 32,128] [--repeats 7] [--sentence_transformers]

Both steps are the real jitted `train_step.build` step (SDE, in-batch softmax at temperature 0.05,
AdamW) on the one real device, at a batch where both fit; `--chunk` is the cached step's
EMBEDDING_CHUNK_SIZE. After a warm-up step each, they run alternately, one step at a time, for
`--repeats` rounds; reported: the median seconds per step of each and cached / plain (the
method's floor is ~4/3: one extra forward pass on top of forward + backward).

With `--sentence_transformers`, the same shape (a randomly initialised HF `T5EncoderModel` with
the size's config, mean pooling, a bias-free Dense projection, Normalize) trains with
sentence-transformers' `CachedMultipleNegativesRankingLoss` (scale 20 = 1 / 0.05,
mini_batch_size = `--chunk`, AdamW), on the same token ids, alternating with our cached step;
reported: examples/s of each and ours / theirs.
"""

import argparse
import os
import statistics

import jax
import numpy as np

import peers  # pylint: disable=g-import-not-at-top  (benchmarks/peers.py)
from samtone_jax import losses
from train_step import model_config_of  # pylint: disable=g-import-not-at-top  (benchmarks/train_step.py)

TEMPERATURE = 0.05


def jax_step(config, batch: dict[str, np.ndarray], chunk: int):
  """A closure running one step of the real train step (state carried between calls)."""
  return peers.jax_train_step(
      config, batch, losses.LossConfig(temperature=TEMPERATURE, same_tower_negatives=False), chunk)


def sentence_transformers_step(config, batch: dict[str, np.ndarray], chunk: int):
  """One step of sentence-transformers' CachedMultipleNegativesRankingLoss on the same shape."""
  from sentence_transformers import losses as st_losses  # pylint: disable=g-import-not-at-top

  model = peers.sentence_transformer(config.encoder, config.projection_dim)
  loss = st_losses.CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE,
                                                      mini_batch_size=chunk)
  return peers.sentence_transformers_train_step(model, loss, batch)


def alternate(steps: dict, repeats: int) -> dict[str, float]:
  """Median seconds per step of each, run alternately after one warm-up (compile) step each."""
  return {name: statistics.median(t) for name, t in peers.alternate(steps, repeats).items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--lengths", default="32,128", help="query,passage token lengths")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--sentence_transformers", action="store_true")
  args = parser.parse_args()
  lq, lp = (int(x) for x in args.lengths.split(","))
  config = model_config_of(args.size)
  rng = np.random.default_rng(0)
  batch = {"queries": rng.integers(2, config.encoder.vocab_size, (args.batch, lq)),
           "passages": rng.integers(2, config.encoder.vocab_size, (args.batch, lp))}
  batch = {k: v.astype(np.int32) for k, v in batch.items()}
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {args.size}, batch "
        f"{args.batch}, chunk {args.chunk}, lengths {lq}/{lp}, median of {args.repeats} "
        "alternating steps\n")
  if args.sentence_transformers:
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    seconds = alternate({"ours": jax_step(config, batch, args.chunk),
                         "sentence-transformers": sentence_transformers_step(config, batch,
                                                                             args.chunk)},
                        args.repeats)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| step | s/step | examples/s |")
    print("| --- | --- | --- |")
    for name, s in seconds.items():
      print(f"| {name} (cached, mini-batch {args.chunk}) | {s:.3f} | {args.batch / s:.1f} |")
    print(f"\nours / sentence-transformers examples/s: "
          f"{seconds['sentence-transformers'] / seconds['ours']:.2f}")
    return
  seconds = alternate({"plain": jax_step(config, batch, 0),
                       "cached": jax_step(config, batch, args.chunk)}, args.repeats)
  print("| step | s/step | examples/s |")
  print("| --- | --- | --- |")
  for name, s in seconds.items():
    print(f"| {name} | {s:.3f} | {args.batch / s:.1f} |")
  print(f"\ncached / plain step time: {seconds['cached'] / seconds['plain']:.2f}")


if __name__ == "__main__":
  main()
