"""Cached vs uncached training input: resume cost at an early and a late step, and the input rate
of 2 processes vs 1 (each process = one host, reading its own share).

Synthetic MS MARCO-format triples (benchmarks/input_pipeline.py's generator: queries ~6 words,
passages ~56 words, one hard negative) are registered as "msmarco_passage_train" with the demo
vocabulary, then cached with `cache.cache_task` (the library of `samtone-cache-tasks`).

Resume: records read, seconds and peak memory to the first batches when resuming at step
`--early_step` and at `--late_step`: uncached, by `start_step` (the pipeline skips raw rows; records
read counted at the Python source), and cached, by restoring the tf.data iterator state saved at
that step (records counted by `record_counter`). Each resume runs in a fresh process (as after a
preemption), which reports its seconds from building the pipeline to the end of its first
`--after_batches` batches and its peak RSS (VmHWM). Printed ratio: late / early (1.0 = constant
time). With `--shuffle_buffer_size 100000` (the MS MARCO task's buffer, runs/pretrain.gin's
default) the cached state holds the full buffer from the first batch on (tf.data fills it before
it yields), so its size and restore time are those of any later step.

Input rate: examples/s of 1 process (pinned to 1 core) vs 2 processes at once (host 0 and host 1
of 2, each pinned to its own core), each reading `--rate_batches` batches after a warm-up; the
ratio is the 2 processes' summed rate over the 1 process's (the issue's goal: >= 1.8). On a
machine shared with other jobs the wall-clock rates follow the scheduler more than the pipeline,
so the script also prints the rate per CPU-second of the slowest host (global batch / the CPU
seconds the slowest host spends per step: the rate with a dedicated core per host), the number
that does not depend on the neighbours. The same for the uncached path, where every host reads
and parses every row in Python (expected well below 2).

  PYTHONPATH=. python benchmarks/input_rate.py [--examples 20000] [--batch_size 64]
  PYTHONPATH=. python benchmarks/input_rate.py --examples 120000 --shuffle_buffer_size 100000 \
      --late_step 3000 --skip_rate        # resume only, with the pretrain shuffle buffer
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import seqio  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import input_pipeline  # pylint: disable=g-import-not-at-top  (benchmarks/, the data generator)
import scale  # pylint: disable=g-import-not-at-top  (benchmarks/scale.py: peak_rss_bytes)
from samtone_jax.tasks import cache  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import msmarco  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import pipeline  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import sources  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top
from samtone_jax.tasks import beir  # pylint: disable=g-import-not-at-top

LENGTHS = input_pipeline.LENGTHS
RAW_ROWS = collections.Counter()


def register(data_dir: str) -> None:
  """msmarco_passage_train over `data_dir` (demo vocabulary), its raw rows counted."""
  def triples():
    for example in msmarco.train_triples(data_dir):
      RAW_ROWS["read"] += 1
      yield example
  source = sources.examples_source({"train": triples}, num_negatives=1)
  beir.register_pairs_task(msmarco.TRAIN_TASK, source, vocab.demo_vocabulary(),
                           with_negatives=True)


def _iterator(args, shard=(0, 1), cached=True, counter=None, start_step=0):
  kwargs = dict(use_cached=True, cache_dirs=[args.cache_dir], record_counter=counter) if cached \
      else dict(start_step=start_step)
  return pipeline.get_train_iterator(msmarco.TRAIN_TASK, LENGTHS, args.batch_size, seed=0,
                                     shard_info=seqio.ShardInfo(*shard),
                                     shuffle_buffer_size=args.shuffle_buffer_size, **kwargs)


def _state_bytes(prefix: str) -> int:
  directory = os.path.dirname(prefix)
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def resume_worker(args) -> None:
  """A fresh process resuming at `args.step` (cached: from the state at `args.prefix`); prints
  {"records", "seconds", "peak_bytes"} as JSON."""
  counts = collections.Counter()
  start = time.perf_counter()
  if args.cached:
    it = _iterator(args, counter=lambda: counts.update(["read"]))
    it.restore(args.prefix)
  else:
    it = _iterator(args, cached=False, start_step=args.step)
  for _ in range(args.after_batches):
    next(it)
  seconds = time.perf_counter() - start
  it.close()
  records = counts["read"] if args.cached else RAW_ROWS["read"]
  print(json.dumps({"records": records, "seconds": seconds, "peak_bytes": scale.peak_rss_bytes()}))


def resume_cost(args, step: int, cached: bool) -> tuple[int, float, int, int]:
  """(records read, seconds, state bytes, peak RSS bytes) of a fresh process resuming at `step`,
  from building the pipeline to the end of its first `args.after_batches` batches."""
  command = [sys.executable, __file__, "--resume_worker", f"--step={step}",
             f"--cache_dir={args.cache_dir}", f"--data_dir={args.data_dir}",
             f"--batch_size={args.batch_size}", f"--after_batches={args.after_batches}",
             f"--shuffle_buffer_size={args.shuffle_buffer_size}"]
  state_bytes = 0
  if cached:
    it = _iterator(args, counter=lambda: None)  # the resumed pipeline's graph: counter included
    for _ in range(step):
      next(it)
    prefix = it.save(os.path.join(args.work_dir, f"input_state_{step}", "state"))
    it.close()
    state_bytes = _state_bytes(prefix)
    command += ["--cached", f"--prefix={prefix}"]
  out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  return result["records"], result["seconds"], state_bytes, result["peak_bytes"]


def worker(args) -> None:
  """One "host": pinned to core `args.core`, reads its share; prints examples/s as JSON."""
  os.sched_setaffinity(0, {args.core})
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  index, count = map(int, args.worker.split("/"))
  it = _iterator(args, shard=(index, count), cached=args.cached)
  for _ in range(args.warmup_batches):
    next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(args.rate_batches):
    next(it)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  local_batch_size = args.batch_size // count  # the global batch is split over the hosts
  print(json.dumps({"examples_per_second": args.rate_batches * local_batch_size / seconds,
                    "cpu_seconds_per_step": cpu_seconds / args.rate_batches}))


def input_rate(args, processes: int, cached: bool) -> tuple[float, float]:
  """(summed examples/s, global examples per CPU-second of the slowest host) of `processes`
  workers run at once, worker i on core i. The second is what the input rate would be with a
  dedicated core per host: B / max over hosts of the CPU seconds a host spends per step."""
  cores = sorted(os.sched_getaffinity(0))
  commands = [[sys.executable, __file__, f"--worker={i}/{processes}", f"--core={cores[i]}",
               f"--cache_dir={args.cache_dir}", f"--data_dir={args.data_dir}",
               f"--batch_size={args.batch_size}", f"--rate_batches={args.rate_batches}",
               f"--warmup_batches={args.warmup_batches}"] + (["--cached"] if cached else [])
              for i in range(processes)]
  commands = [c + [f"--shuffle_buffer_size={args.shuffle_buffer_size}"] for c in commands]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
  rates, cpu_per_step = [], []
  for proc in procs:
    out, _ = proc.communicate()
    if proc.returncode:
      raise RuntimeError(f"worker failed with status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    rates.append(result["examples_per_second"])
    cpu_per_step.append(result["cpu_seconds_per_step"])
  return sum(rates), args.batch_size / max(cpu_per_step)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=20000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_shards", type=int, default=8)
  parser.add_argument("--early_step", type=int, default=10)
  parser.add_argument("--late_step", type=int, default=1500)
  parser.add_argument("--rate_batches", type=int, default=150)
  parser.add_argument("--warmup_batches", type=int, default=20)
  parser.add_argument("--shuffle_buffer_size", type=int, default=2000)
  parser.add_argument("--after_batches", type=int, default=10)
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--work_dir", default=None)
  parser.add_argument("--skip_uncached_rate", action="store_true")
  parser.add_argument("--skip_rate", action="store_true", help="measure the resume only")
  # worker mode (internal)
  parser.add_argument("--worker", default=None)
  parser.add_argument("--core", type=int, default=0)
  parser.add_argument("--cached", action="store_true")
  parser.add_argument("--cache_dir", default=None)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--resume_worker", action="store_true")
  parser.add_argument("--step", type=int, default=0)
  parser.add_argument("--prefix", default=None)
  args = parser.parse_args()

  if args.worker or args.resume_worker:
    register(args.data_dir)
    (worker if args.worker else resume_worker)(args)
    return

  args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="input_rate_")
  args.data_dir = os.path.join(args.work_dir, "msmarco")
  args.cache_dir = os.path.join(args.work_dir, "cache")
  os.makedirs(args.data_dir, exist_ok=True)
  input_pipeline.write_synthetic_msmarco(args.data_dir, args.examples)
  register(args.data_dir)
  start = time.perf_counter()
  cache.cache_task(msmarco.TRAIN_TASK, args.cache_dir, num_shards=args.num_shards,
                   overwrite=True)
  print(f"cached {args.examples} examples into {args.num_shards} shards in "
        f"{time.perf_counter() - start:.1f} s ({args.work_dir})", flush=True)

  print(f"\nresume at step s (batch {args.batch_size}, shuffle buffer "
        f"{args.shuffle_buffer_size}): records read, seconds and peak RSS of a fresh process from "
        f"building the pipeline to the end of its first {args.after_batches} batches")
  for cached in (False, True):
    results = {s: resume_cost(args, s, cached) for s in (args.early_step, args.late_step)}
    (r_early, t_early, b_early, m_early), (r_late, t_late, b_late, m_late) = (
        results[args.early_step], results[args.late_step])
    state = f"; input state {b_early / 2**20:.1f} / {b_late / 2**20:.1f} MiB" if cached else ""
    print(f"  {'cached  ' if cached else 'uncached'}: s={args.early_step}: {r_early} records, "
          f"{t_early:.2f} s, peak {m_early / 2**30:.2f} GiB; s={args.late_step}: {r_late} "
          f"records, {t_late:.2f} s, peak {m_late / 2**30:.2f} GiB; late/early: records "
          f"{r_late / max(r_early, 1):.2f}x, time {t_late / t_early:.2f}x{state}", flush=True)
  if args.skip_rate:
    return

  print(f"\ninput rate, examples/s (1 core per process, {args.rate_batches} batches each after "
        f"{args.warmup_batches}; median of {args.trials} alternating trials)")
  median = lambda values: sorted(values)[len(values) // 2]
  for cached in ((True,) if args.skip_uncached_rate else (True, False)):
    ones, twos = [], []
    for _ in range(args.trials):
      ones.append(input_rate(args, 1, cached))
      twos.append(input_rate(args, 2, cached))
    wall = [median([r[0] for r in ones]), median([r[0] for r in twos])]
    cpu = [median([r[1] for r in ones]), median([r[1] for r in twos])]
    name = "cached  " if cached else "uncached"
    print(f"  {name} wall clock: 1 process {wall[0]:.0f}, 2 processes {wall[1]:.0f} "
          f"(trials {', '.join(f'{a[0]:.0f}/{b[0]:.0f}' for a, b in zip(ones, twos))}): "
          f"ratio {wall[1] / wall[0]:.2f}x", flush=True)
    print(f"  {name} per CPU-second of the slowest host: 1 process {cpu[0]:.0f}, 2 processes "
          f"{cpu[1]:.0f}: ratio {cpu[1] / cpu[0]:.2f}x", flush=True)


if __name__ == "__main__":
  main()
