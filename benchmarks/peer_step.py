"""Our plain train step and time to first step vs sentence-transformers, same shape, same tokens.

  cd benchmarks && python peer_step.py [--configs tiny:64,tiny:256,tiny:1024,small:32]
      [--losses in-batch,samtone] [--lengths 32,128] [--repeats 5]
      [--first_step_config tiny:64] [--first_step_repeats 3] [--no_steps] [--no_first_step]

Train step (`--configs SIZE:BATCH,...`, sizes from gin/models/SIZE.gin with SDE, one shared
tower): ours is the real jitted `train_step.build` step (AdamW, gradient clipping at 1.0, loss at
`LossConfig`'s default temperature) on the one real CPU device (JAX_PLATFORMS=cpu, no fake
devices); the peer is sentence-transformers' `MultipleNegativesRankingLoss` with scale =
1 / temperature on the same shape (`peers.sentence_transformer`: HF `T5EncoderModel`, mean
pooling, bias-free Dense, Normalize; torch AdamW, clipping at 1.0, as many torch threads as this
process has cores). Both train with T5's dropout 0.1 on every site, attention weights included
(our ATTENTION_DROPOUT_RATE default None = DROPOUT_RATE). Losses:

  in-batch  ours `same_tower_negatives=False`; peer `directions=("query_to_doc",)`.
  samtone   ours `same_tower_negatives=True` (query side only, `bidirectional=False`); peer
            `directions=("query_to_doc", "query_to_query")`, `partition_mode="joint"`: one
            softmax per query over the batch's documents and the other queries, the same loss.

Both get the same random token ids (no padding), lengths `--lengths` (queries, passages). After a
warm-up (compile) step each, one step of ours and one of the peer alternate for `--repeats`
rounds, each side in its own worker process (this script started again), timed inside it; reported: seconds per step as median [min-max], and peer s / ours s per round as median
[min-max] (> 1: ours is that many times faster).

Time to first step (`--first_step_config`, SamToNe): each measurement is a fresh Python process,
timed by the wall clock from just before it is started to the end of its first train step:
interpreter start, imports, model build and initialisation, compilation (ours) and step 1. Ours
imports jax and samtone_jax's step (not the trainer's seqio/TensorFlow input pipeline), parses the
size's gin files, `train_step.build`s, initialises and runs one step, with the persistent
compilation cache configured as every command does (`compilation_cache.configure`) in
SAMTONE_COMPILATION_CACHE_DIR: "cold" is a new empty directory, "warm" the same directory again
right after, so every program comes from the cache. The peer imports torch, transformers and
sentence_transformers, builds the model and loss and runs one step. Each round runs cold, warm,
peer; reported per variant: total, import, build + init and first-step seconds, median [min-max],
and peer s / ours s per round.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

import peers  # pylint: disable=g-import-not-at-top  (benchmarks/peers.py)

LOSSES = {"in-batch": ("query_to_doc",), "samtone": ("query_to_doc", "query_to_query")}
GRAD_CLIP_NORM = 1.0  # our OptimizerConfig's default and sentence-transformers Trainer's


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


def token_batch(vocab_size: int, batch: int, lq: int, lp: int) -> dict[str, np.ndarray]:
  """The same random token ids (2..vocab-1: no padding, no EOS) for ours and the peer."""
  rng = np.random.default_rng(0)
  return {"queries": rng.integers(2, vocab_size, (batch, lq)).astype(np.int32),
          "passages": rng.integers(2, vocab_size, (batch, lp)).astype(np.int32)}


def our_step(size: str, batch: dict[str, np.ndarray], loss: str):
  """(step closure, temperature): our real train step for gin/models/SIZE.gin with SDE."""
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  from train_step import model_config_of  # pylint: disable=g-import-not-at-top

  loss_config = losses.LossConfig(same_tower_negatives=(loss == "samtone"), bidirectional=False)
  step = peers.jax_train_step(model_config_of(size), batch, loss_config)
  return step, loss_config.temperature


def peer_step(encoder, projection_dim: int, batch: dict[str, np.ndarray], loss: str,
              temperature: float):
  """One-step closure of sentence-transformers' MultipleNegativesRankingLoss, same shape."""
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers.sentence_transformer import losses as st_losses  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(num_cores())
  torch.manual_seed(0)
  model = peers.sentence_transformer(encoder, projection_dim)
  mnrl = st_losses.MultipleNegativesRankingLoss(model, scale=1 / temperature,
                                                directions=LOSSES[loss], partition_mode="joint")
  return peers.sentence_transformers_train_step(model, mnrl, batch, GRAD_CLIP_NORM)


def shape_of(size: str) -> tuple[dict, int]:
  """(T5 fields the peer needs, projection_dim) of gin/models/SIZE.gin, as plain JSON."""
  from train_step import model_config_of  # pylint: disable=g-import-not-at-top

  config = model_config_of(size)
  fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "feed_forward_proj", "dropout_rate", "relative_attention_num_buckets",
            "relative_attention_max_distance")
  return {f: getattr(config.encoder, f) for f in fields}, config.projection_dim


def ratio_spread(ours: list[float], peer: list[float]) -> str:
  return peers.spread([p / o for o, p in zip(ours, peer)], 2)


def build_step(kind: str, spec: dict):
  """The one-step closure of `kind` ("ours" or "peer") for a worker/child process's `spec`."""
  batch = token_batch(spec["encoder"]["vocab_size"], spec["batch"], *spec["lengths"])
  if kind == "ours":
    step, _ = our_step(spec["size"], batch, spec["loss"])
    return step
  return peer_step(types.SimpleNamespace(**spec["encoder"]), spec["projection_dim"], batch,
                   spec["loss"], spec["temperature"])


def start_process(kind: str, mode: str, spec: dict, cache_dir: str | None) -> subprocess.Popen:
  """This script as a fresh `mode` ("first_step" or "worker") process of `kind`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # it would win over SAMTONE_COMPILATION_CACHE_DIR
  env["SAMTONE_COMPILATION_CACHE_DIR"] = cache_dir or "off"
  command = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--_mode", mode,
             "--_spec", json.dumps(spec)]
  # stderr to a file: a pipe nobody reads while the child runs could fill up and block it.
  error_file = tempfile.TemporaryFile(mode="w+")
  process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=error_file, text=True)
  process.error_file = error_file
  return process


def read_message(process: subprocess.Popen, kind: str) -> dict:
  """The next `MESSAGE {json}` line of a child; its stderr in the error if it died."""
  for line in process.stdout:
    if line.startswith("MESSAGE "):
      return json.loads(line[len("MESSAGE "):])
  process.wait()
  process.error_file.seek(0)
  raise RuntimeError(f"{kind} process failed ({process.returncode}):\n"
                     f"{process.error_file.read()[-3000:]}")


def send_message(message: dict) -> None:
  print("MESSAGE " + json.dumps(message), flush=True)


def worker(kind: str, spec: dict) -> None:
  """A step-table process: builds its step, runs the warm-up step, then one step per "step"."""
  step = build_step(kind, spec)
  start = time.perf_counter()
  step()
  send_message({"warmup": time.perf_counter() - start})
  for line in sys.stdin:
    if line.strip() != "step":
      break
    start = time.perf_counter()
    step()
    send_message({"seconds": time.perf_counter() - start})


def alternate_workers(spec: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds per step of ours and the peer, each in its own process, one step at a time.

  Separate processes, so that neither library's thread pools (which spin for a while after their
  work) nor its allocator can slow the other's step. Only one process steps at a time; the other
  waits on its input.
  """
  processes = {kind: start_process(kind, "worker", spec, None) for kind in ("ours", "peer")}
  try:
    for kind, process in processes.items():  # build + warm-up, one after the other
      read_message(process, kind)
    times = {kind: [] for kind in processes}
    for _ in range(repeats):
      for kind, process in processes.items():
        process.stdin.write("step\n")
        process.stdin.flush()
        times[kind].append(read_message(process, kind)["seconds"])
    return times
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.stdin.close()
        process.wait()


def train_steps(configs: list[tuple[str, int]], loss_names: list[str], lq: int, lp: int,
                repeats: int) -> None:
  """Prints the step table: ours vs the peer, alternating, for each config and loss."""
  import torch  # pylint: disable=g-import-not-at-top
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top

  print(f"## Train step: the one CPU device, {num_cores()} cores; torch {torch.__version__} with "
        f"{num_cores()} threads; lengths {lq}/{lp}, fp32, AdamW, dropout 0.1; ours and the peer "
        f"each in its own process, {repeats} alternating rounds after a warm-up step each\n",
        flush=True)
  print("| size | batch | loss | ours s/step | peer s/step | ours ex/s | peer ex/s "
        "| peer s / ours s |")
  print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
  for size, batch_size in configs:
    encoder, projection_dim = shape_of(size)
    for loss in loss_names:
      spec = {"size": size, "batch": batch_size, "lengths": [lq, lp], "loss": loss,
              "encoder": encoder, "projection_dim": projection_dim,
              "temperature": losses.LossConfig().temperature}
      times = alternate_workers(spec, repeats)
      o, p = times["ours"], times["peer"]
      print(f"| {size} | {batch_size} | {loss} | {peers.spread(o)} | {peers.spread(p)} | "
            f"{batch_size / np.median(o):.1f} | {batch_size / np.median(p):.1f} | "
            f"**{ratio_spread(o, p)}** |", flush=True)


def first_step_child(kind: str, spec: dict) -> None:
  """A time-to-first-step process: sends {"imported", "built", "stepped"} as time.time()."""
  marks = {}
  if kind == "ours":
    from samtone_jax import compilation_cache  # pylint: disable=g-import-not-at-top
    import samtone_jax.train_step  # pylint: disable=g-import-not-at-top,unused-import
    marks["imported"] = time.time()
    marks["cache_dir"] = compilation_cache.configure()  # SAMTONE_COMPILATION_CACHE_DIR
  else:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import sentence_transformers  # pylint: disable=g-import-not-at-top,unused-import
    marks["imported"] = time.time()
  step = build_step(kind, spec)
  marks["built"] = time.time()
  step()
  marks["stepped"] = time.time()
  send_message(marks)


def run_first_step(kind: str, spec: dict, cache_dir: str | None) -> dict[str, float]:
  """Starts a fresh process for `kind`; returns its phase seconds from just before the start."""
  start = time.time()
  process = start_process(kind, "first_step", spec, cache_dir)
  process.stdin.close()
  marks = read_message(process, kind)
  process.wait()
  if kind == "ours" and marks["cache_dir"] != cache_dir:
    raise RuntimeError(f"our child used cache {marks['cache_dir']!r}, not {cache_dir!r}")
  return {"total": marks["stepped"] - start, "import": marks["imported"] - start,
          "build + init": marks["built"] - marks["imported"],
          "first step": marks["stepped"] - marks["built"]}


def cache_entries(directory: str) -> set[str]:
  return {n for n in os.listdir(directory) if not n.startswith(".")}


def first_step(size: str, batch_size: int, lq: int, lp: int, repeats: int) -> None:
  """Prints the time-to-first-step table: ours cold, ours warm, peer; fresh processes."""
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top

  encoder, projection_dim = shape_of(size)
  spec = {"size": size, "batch": batch_size, "lengths": [lq, lp], "loss": "samtone",
          "encoder": encoder, "projection_dim": projection_dim,
          "temperature": losses.LossConfig().temperature}
  variants = ("ours, cold cache", "ours, warm cache", "peer")
  times = {v: [] for v in variants}
  written = []
  root = tempfile.mkdtemp(prefix="peer_step_cache_")
  try:
    for round_index in range(repeats):
      cache_dir = os.path.join(root, f"round{round_index}")  # new, empty: cold
      os.makedirs(cache_dir)
      times["ours, cold cache"].append(run_first_step("ours", spec, cache_dir))
      after_cold = cache_entries(cache_dir)
      times["ours, warm cache"].append(run_first_step("ours", spec, cache_dir))
      # Every program of the warm run was read from the cache: it wrote nothing new.
      written.append((len(after_cold), len(cache_entries(cache_dir) - after_cold)))
      times["peer"].append(run_first_step("peer", spec, None))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\n## Time to first step: {size}, batch {batch_size}, SamToNe, lengths {lq}/{lp}; "
        f"fresh process each, {repeats} rounds of (cold, warm, peer); cache entries written "
        f"(cold, then new by warm) per round: {written}\n")
  phases = ("total", "import", "build + init", "first step")
  print("| variant | " + " | ".join(f"{p} s" for p in phases) + " | peer s / ours s |")
  print("| --- |" + " ---: |" * (len(phases) + 1))
  peer_totals = [t["total"] for t in times["peer"]]
  for variant in variants:
    cells = [peers.spread([t[p] for t in times[variant]], 1) for p in phases]
    totals = [t["total"] for t in times[variant]]
    ratio = "—" if variant == "peer" else f"**{ratio_spread(totals, peer_totals)}**"
    print(f"| {variant} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


def parse_configs(text: str) -> list[tuple[str, int]]:
  configs = []
  for item in text.split(","):
    size, _, batch = item.partition(":")
    if not batch.isdigit():
      raise SystemExit(f"--configs: expected SIZE:BATCH items (e.g. tiny:64), got {item!r}")
    configs.append((size, int(batch)))
  return configs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny:64,tiny:256,tiny:1024,small:32",
                      help="SIZE:BATCH items of the step table (gin/models/SIZE.gin)")
  parser.add_argument("--losses", default="in-batch,samtone")
  parser.add_argument("--lengths", default="32,128", help="query,passage token lengths")
  parser.add_argument("--repeats", type=int, default=5, help="alternating timed step rounds")
  parser.add_argument("--first_step_config", default="tiny:64")
  parser.add_argument("--first_step_repeats", type=int, default=3)
  parser.add_argument("--no_steps", action="store_true", help="skip the step table")
  parser.add_argument("--no_first_step", action="store_true",
                      help="skip the time-to-first-step table")
  parser.add_argument("--_child", choices=("ours", "peer"), help=argparse.SUPPRESS)
  parser.add_argument("--_mode", choices=("first_step", "worker"), help=argparse.SUPPRESS)
  parser.add_argument("--_spec", help=argparse.SUPPRESS)
  args = parser.parse_args()
  # pylint: disable=protected-access
  if args._child:
    spec = json.loads(args._spec)
    (first_step_child if args._mode == "first_step" else worker)(args._child, spec)
    return
  # pylint: enable=protected-access
  # One real CPU device: one XLA process against one torch process on the same cores.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("XLA_FLAGS fakes CPU devices; run with one real device (unset XLA_FLAGS).")
  lq, lp = (int(x) for x in args.lengths.split(","))
  losses_ = args.losses.split(",")
  unknown = set(losses_) - set(LOSSES)
  if unknown:
    raise SystemExit(f"--losses: unknown {sorted(unknown)}; choose from {sorted(LOSSES)}")
  if not args.no_steps:
    train_steps(parse_configs(args.configs), losses_, lq, lp, args.repeats)
  if not args.no_first_step:
    (size, batch_size), = parse_configs(args.first_step_config)
    first_step(size, batch_size, lq, lp, args.first_step_repeats)


if __name__ == "__main__":
  main()
