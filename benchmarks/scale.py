"""MS MARCO at scale: peak memory and wall time vs corpus size, extrapolated to the full collection.

Writes synthetic MS MARCO in the official formats (collection.tsv with ~60-word passages,
queries.train.tsv, qrels.train.tsv, qidpidtriples.train.full.2.tsv, queries.dev.small.tsv and
qrels.dev.small.tsv with 1,000 dev queries) at each size, then measures, each in a fresh
subprocess (so one measurement's allocator state never leaks into the next), its peak resident
set size (the kernel's VmHWM) and wall time:

  first_batch  the first batch of "msmarco_passage_train" (the qidpidtriples join against
               collection.tsv and queries.train.tsv), batch 32, lengths 64 / 256;
  resume       the first batch at a late step (90% of the triples already consumed);
  evaluate     "msmarco_passage_dev_small": 1,000 queries against the whole collection, the tiny
               T5 model with a 768-d projection (GTR-base's embedding size), random weights,
               lengths 16 / 64, k = 1000, on one CPU device.

A linear fit peak = fixed + slope * passages over the measured sizes is extrapolated to 1M and to
the full 8,841,823 passages (400M triples at the real ratio; here triples = 10 x passages, so the
training stages' fit is in passages with triples in that proportion).

  python benchmarks/scale.py --sizes 50000,100000,200000 --stages evaluate \
      [--embeddings disk|memory] [--embedding_dtype float32|bfloat16] [--code_dir DIR]

`--code_dir` runs the measurements against another checkout of samtone_jax (e.g. an export of
main, for a before/after table); options that checkout lacks (embedding dtype) are left out.
"""

import argparse
import gzip
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

FULL_PASSAGES, FULL_TRIPLES = 8_841_823, 400_000_000
PASSAGE_WORDS, QUERY_WORDS = 60, 6
NUM_DEV_QUERIES = 1000
TRIPLES_PER_PASSAGE = 10
TRAIN_LENGTHS = {"queries": 64, "passages": 256}
EVAL_LENGTHS = {"queries": 16, "passages": 64}
GIB = 2.0**30


def _words() -> np.ndarray:
  """The demo corpus's words (real English tokens for the SentencePiece vocabulary)."""
  from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top
  with gzip.open(os.path.join(vocab.DEMO_DATA_DIR, "corpus.jsonl.gz"), "rt") as f:
    return np.array(sorted({w for line in f for w in json.loads(line)["text"].split()}))


def write_msmarco(directory: str, num_passages: int, num_triples: int, seed: int = 0) -> None:
  """Official-format MS MARCO passage files with `num_passages` passages (pids 0..n-1)."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = _words()

  def write_texts(path, num, mean_words, first_id=0):
    with open(path, "w", encoding="utf-8") as f:
      for start in range(0, num, 10_000):
        rows = []
        for i in range(start, min(start + 10_000, num)):
          picked = words[rng.integers(len(words), size=max(1, rng.poisson(mean_words)))]
          rows.append(f"{first_id + i}\t{' '.join(picked)}\n")
        f.write("".join(rows))

  write_texts(os.path.join(directory, "collection.tsv"), num_passages, PASSAGE_WORDS)
  num_train_queries = max(1000, num_passages // 10)
  write_texts(os.path.join(directory, "queries.train.tsv"), num_train_queries, QUERY_WORDS)
  positives = rng.integers(num_passages, size=num_train_queries)
  with open(os.path.join(directory, "qrels.train.tsv"), "w") as f:
    f.write("".join(f"{q}\t0\t{p}\t1\n" for q, p in enumerate(positives.tolist())))
  with open(os.path.join(directory, "qidpidtriples.train.full.2.tsv"), "w") as f:
    for start in range(0, num_triples, 1_000_000):
      qids = rng.integers(num_train_queries, size=min(1_000_000, num_triples - start))
      negatives = rng.integers(num_passages, size=len(qids))
      f.write("".join(f"{q}\t{p}\t{n}\n" for q, p, n in
                      zip(qids.tolist(), positives[qids].tolist(), negatives.tolist())))
  dev_first = 10_000_000  # dev qids apart from the train ones, as in the real files
  write_texts(os.path.join(directory, "queries.dev.small.tsv"), NUM_DEV_QUERIES, QUERY_WORDS,
              first_id=dev_first)
  with open(os.path.join(directory, "qrels.dev.small.tsv"), "w") as f:
    f.write("".join(f"{dev_first + q}\t0\t{p}\t1\n"
                    for q, p in enumerate(rng.integers(num_passages, size=NUM_DEV_QUERIES))))


def peak_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def _current_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def measure(args) -> dict:
  """One stage in this (fresh) process; returns peak RSS and times."""
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import msmarco  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top
  msmarco.register(args.data_dir, vocabulary=vocab.demo_vocabulary())
  extra = {}
  if args.stage in ("first_batch", "resume"):
    from samtone_jax.tasks import pipeline  # pylint: disable=g-import-not-at-top
    batch_size = 32
    start_step = 0 if args.stage == "first_batch" else int(0.9 * args.triples) // batch_size
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    iterator = pipeline.get_train_iterator(msmarco.TRAIN_TASK, TRAIN_LENGTHS, batch_size, seed=0,
                                           start_step=start_step,
                                           shard_info=seqio.ShardInfo(0, 1))
    batch = next(iterator)
    assert batch["queries"].shape == (batch_size, TRAIN_LENGTHS["queries"])
    extra["start_step"] = start_step
  else:
    from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
    from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    from samtone_jax.models import config as model_config  # pylint: disable=g-import-not-at-top
    from samtone_jax.models import dual_encoder  # pylint: disable=g-import-not-at-top
    config = model_config.DualEncoderConfig(
        encoder=model_config.T5Config(vocab_size=8000, d_model=64, d_ff=128, num_heads=4,
                                      num_layers=2, d_kv=16, feed_forward_proj="gated-gelu",
                                      dropout_rate=0.0),
        projection_dim=768)
    module = dual_encoder.DualEncoder(config)
    mesh = partitioning.create_mesh(-1, 1)
    tokens = jax.numpy.ones((1, 8), jax.numpy.int32)
    variables, _ = partitioning.sharded_init(lambda rng: module.init(rng, tokens, tokens), mesh,
                                             jax.random.key(0))
    kwargs = {}
    if args.embeddings == "disk":
      kwargs["embeddings_dir"] = tempfile.mkdtemp(dir=args.work_dir, prefix="embeddings_")
    if "embedding_dtype" in inspect.signature(runner.evaluate_params).parameters:
      kwargs["embedding_dtype"] = args.embedding_dtype
    elif args.embedding_dtype != "float32":
      raise SystemExit(f"{args.code_dir or 'this checkout'} has no embedding_dtype option")
    extra["options"] = sorted(kwargs)
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    results = runner.evaluate_params(module, {"model": variables["params"]}, mesh,
                                     [msmarco.DEV_EVAL_SET], feature_lengths=EVAL_LENGTHS,
                                     **kwargs)
    extra["mrr@10"] = results[f"{msmarco.DEV_EVAL_SET}/mrr@10"]
  seconds = time.perf_counter() - start
  return dict(stage=args.stage, passages=args.passages, triples=args.triples,
              seconds=round(seconds, 1), peak_gib=round(peak_rss_bytes() / GIB, 3),
              baseline_gib=round(baseline / GIB, 3), **extra)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="50000,100000,200000",
                      help="comma-separated passage counts (keep <= 300000 on a shared machine)")
  parser.add_argument("--stages", default="first_batch,resume,evaluate")
  parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "samtone_scale"))
  parser.add_argument("--embeddings", choices=("disk", "memory"), default="disk",
                      help="evaluate with EVAL_EMBEDDINGS_DIR (disk) or in memory")
  parser.add_argument("--embedding_dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--code_dir", default=None,
                      help="another samtone_jax checkout to measure (PYTHONPATH for the children)")
  # Internal: one measurement (a child process).
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--stage", help=argparse.SUPPRESS)
  parser.add_argument("--data_dir", help=argparse.SUPPRESS)
  parser.add_argument("--passages", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--triples", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print("RESULT " + json.dumps(measure(args)), flush=True)
    return

  os.makedirs(args.work_dir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS="")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in [args.code_dir or os.getcwd(), env.get("PYTHONPATH", "")] if p)
  code = args.code_dir or os.getcwd()
  print(f"code: {code}; embeddings: {args.embeddings}, {args.embedding_dtype}", flush=True)
  rows = []
  for passages in [int(s) for s in args.sizes.split(",")]:
    triples = TRIPLES_PER_PASSAGE * passages
    data_dir = os.path.join(args.work_dir, f"msmarco_{passages}")
    if not os.path.exists(os.path.join(data_dir, "qrels.dev.small.tsv")):
      start = time.perf_counter()
      write_msmarco(data_dir, passages, triples)
      print(f"wrote {data_dir} in {time.perf_counter() - start:.0f}s", flush=True)
    for stage in args.stages.split(","):
      command = [sys.executable, os.path.abspath(__file__), "--measure", "--stage", stage,
                 "--data_dir", data_dir, "--passages", str(passages), "--triples", str(triples),
                 "--work_dir", args.work_dir, "--embeddings", args.embeddings,
                 "--embedding_dtype", args.embedding_dtype]
      start = time.perf_counter()
      done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
      if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{stage} at {passages} passages failed")
      result = json.loads(next(l for l in done.stdout.splitlines()
                               if l.startswith("RESULT "))[7:])
      result["process_seconds"] = round(time.perf_counter() - start, 1)
      rows.append(result)
      print(json.dumps(result), flush=True)
  print("\n| stage | passages | triples | peak RSS GiB | stage s | process s |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['stage']} | {r['passages']:,} | {r['triples']:,} | {r['peak_gib']:.2f} | "
          f"{r['seconds']:.1f} | {r['process_seconds']:.1f} |")
  print("\nLinear fit peak = fixed + slope * passages (GiB), extrapolated:")
  print("| stage | fixed GiB | GiB per 1M passages | at 1M | at 8.8M (400M triples) |")
  print("|---|---:|---:|---:|---:|")
  for stage in args.stages.split(","):
    points = [(r["passages"], r["peak_gib"]) for r in rows if r["stage"] == stage]
    if len(points) < 2:
      continue
    slope, fixed = np.polyfit(*zip(*points), 1)
    print(f"| {stage} | {fixed:.2f} | {slope * 1e6:.2f} | {fixed + slope * 1e6:.2f} | "
          f"{fixed + slope * FULL_PASSAGES:.2f} |")


if __name__ == "__main__":
  main()
