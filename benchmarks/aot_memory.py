#!/usr/bin/env python3
"""Per-chip memory of the train step on TPU topologies, by model size and batch, compiled AOT.

For each (model size, topology) this compiles the real train step (launch/aot_compile.py, one
subprocess per compile so that a large compile's memory is returned) at the listed batch sizes,
then searches the largest batch that fits: doubling from the largest fitting batch until one
does not fit, then bisecting between the two (on multiples of the topology's data axis) for
`--bisect_steps` steps. Every compile is appended to a JSONL file as it finishes, so a long run
can be stopped and resumed (finished compiles are not repeated) and the table printed at any time.

  JAX_PLATFORMS=cpu python benchmarks/aot_memory.py --sizes=base,large,xl \
      --topologies=v5e:4x4,v4:2x2x2 --batches=512,2048 --results=benchmarks/results/aot_memory.jsonl \
      --variant=scan_remat_full --gin=--gin.config.T5Config.scan_layers=True \
      --gin=--gin.config.T5Config.remat=True --gin=--gin.config.T5Config.remat_policy="'full'"
  python benchmarks/aot_memory.py --results=benchmarks/results/aot_memory.jsonl --table_only

The gradient-cached step (README "Large batches") is a variant like any other: add
`--gin=--gin.EMBEDDING_CHUNK_SIZE=256 --gin=--gin.LOSS_CHUNK_SIZE=256` (per-chip encoder chunk and
loss anchor block) to the scan/remat overrides above, with `--variant=cached_c256_r256_scan_remat_full`.

An unrolled base compile takes ~13 minutes of one CPU core (a minute per layer); with the layers
scanned (`T5Config.scan_layers`) any size takes ~4, and a configuration that does not fit is
refused by XLA in seconds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_SCRIPT = os.path.join(REPO, "launch", "aot_compile.py")
GIB = 1024**3


# The run compiled by default: GTR-style SDE, SamToNe loss, the pretraining run's optimizer
# (Adafactor), lengths 64/256; `{size}` is replaced by the model size.
DEFAULT_GIN_FILES = ("models/{size}.gin,architectures/sde.gin,losses/samtone.gin,"
                     "runs/pretrain.gin")
# The data is never read; the dual encoder's lengths apply only to the default gin files (another
# run, e.g. an encoder-decoder experiment, keeps its own TASK_FEATURE_LENGTHS).
DEFAULT_GIN = ("--gin.MIXTURE_OR_TASK_NAME='unused_by_aot'",)
DEFAULT_LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'queries': 64, 'passages': 256}"


def compile_once(gin_files: str, size: str, topology: str, batch: int,
                 extra_gin: list[str], timeout: float) -> dict:
  """Runs launch/aot_compile.py once; returns its JSON report (plus size/batch/status)."""
  out = os.path.join("/tmp", f"aot_{os.getpid()}_{size}_{topology.replace(':', '_')}_{batch}.json")
  files = [f"--gin_file={f.format(size=size)}" for f in gin_files.split(",")]
  lengths = [DEFAULT_LENGTHS] if gin_files == DEFAULT_GIN_FILES else []
  cmd = [sys.executable, AOT_SCRIPT, f"--topology={topology}", *files, *DEFAULT_GIN, *lengths,
         f"--gin.BATCH_SIZE={batch}", *extra_gin, f"--json_output={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  start = time.time()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return dict(size=size, topology=topology, batch_size=batch, status="timeout",
                wall_seconds=time.time() - start)
  record = dict(size=size, topology=topology, batch_size=batch, wall_seconds=time.time() - start)
  if os.path.exists(out):
    with open(out) as f:
      record.update(json.load(f))
    os.remove(out)
    record["status"] = "fits" if record["fits"] else "does_not_fit"
  else:
    # Not a memory verdict (aot_compile reports XLA's HBM refusal as "does not fit"): a bug or
    # a bad configuration; the search for this size and topology stops.
    record.update(status="error", error=proc.stderr[-2000:])
  return record


def largest_fitting_batch(records: list[dict]) -> tuple[int | None, int | None]:
  """(largest batch that fits, smallest batch that does not) among the records."""
  fits = [r["batch_size"] for r in records if r["status"] == "fits"]
  fails = [r["batch_size"] for r in records if r["status"] == "does_not_fit"]
  return (max(fits) if fits else None), (min(fails) if fails else None)


def _variant(record: dict) -> str:
  return record.get("variant", "default")


def markdown_table(records: list[dict]) -> str:
  groups: dict[tuple[str, str, str], list[dict]] = {}
  for r in records:
    groups.setdefault((_variant(r), r["size"], r["topology"]), []).append(r)
  lines = ["| variant | size | topology | mesh | batch | args GiB | temps GiB | total GiB | HBM GiB |"
           " fits | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (variant, size, topology), rs in groups.items():
    for r in sorted(rs, key=lambda r: r["batch_size"]):
      if r["status"] in ("fits", "does_not_fit"):
        lines.append(
            f"| {variant} | {size} | {topology} | {tuple(r['mesh_shape'])} | {r['batch_size']} | "
            f"{r['argument_bytes'] / GIB:.2f} | {r['temp_bytes'] / GIB:.2f} | "
            f"{r['total_bytes'] / GIB:.2f} | {r['hbm_bytes'] / GIB:.0f} | "
            f"{'yes' if r['fits'] else 'no'} | {r['compile_seconds']:.0f} |")
      else:
        lines.append(f"| {variant} | {size} | {topology} | | {r['batch_size']} | | | | | "
                     f"{r['status']} | |")
  lines += ["", "| variant | size | topology | largest batch that fits | smallest that does not |",
            "|---|---|---|---|---|"]
  for (variant, size, topology), rs in groups.items():
    fit, fail = largest_fitting_batch(rs)
    lines.append(f"| {variant} | {size} | {topology} | {fit} | {fail} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gin_files", default=DEFAULT_GIN_FILES,
                      help="Comma-separated gin files; {size} is replaced by each size.")
  parser.add_argument("--sizes", default="base,large,xl", help="gin/models/<size>.gin names.")
  parser.add_argument("--topologies", default="v5e:4x4,v4:2x2x2")
  parser.add_argument("--batches", default="512,2048", help="Batches always compiled.")
  parser.add_argument("--data_axis", type=int, default=None,
                      help="Bisect on multiples of this (default: the topology's chip count).")
  parser.add_argument("--bisect_steps", type=int, default=1)
  parser.add_argument("--no_search", action="store_true",
                      help="Compile only --batches; no search for the largest batch.")
  parser.add_argument("--max_batch", type=int, default=65536)
  parser.add_argument("--gin", action="append", default=[],
                      help="Extra --gin.X=Y overrides for every compile (repeatable).")
  parser.add_argument("--variant", default="default",
                      help="A name for this set of --gin overrides; records and the table are "
                           "keyed by (variant, size, topology, batch).")
  parser.add_argument("--timeout", type=float, default=3600, help="Seconds per compile.")
  parser.add_argument("--results", required=True, help="JSONL file, appended to.")
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args()

  records = []
  if os.path.exists(args.results):
    with open(args.results) as f:
      records = [json.loads(line) for line in f if line.strip()]
  if not args.table_only:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)

    def measure(size, topology, batch):
      for r in records:
        if (_variant(r), r["size"], r["topology"], r["batch_size"]) == (
            args.variant, size, topology, batch):
          return r
      r = compile_once(args.gin_files, size, topology, batch, args.gin, args.timeout)
      r.update(variant=args.variant, extra_gin=args.gin)
      records.append(r)
      with open(args.results, "a") as f:
        f.write(json.dumps(r) + "\n")
      print(f"{args.variant} {size} {topology} batch {batch}: {r['status']} "
            f"{r.get('total_bytes', 0) / GIB:.2f} GiB ({r['wall_seconds']:.0f}s)", flush=True)
      return r

    for size in args.sizes.split(","):
      for topology in args.topologies.split(","):
        for batch in map(int, args.batches.split(",")):
          measure(size, topology, batch)
        if args.no_search:
          continue
        group = [r for r in records
                 if (_variant(r), r["size"], r["topology"]) == (args.variant, size, topology)]
        if any(r["status"] in ("error", "timeout") for r in group):
          print(f"{size} {topology}: a compile failed (see {args.results}); no search.")
          continue
        step = args.data_axis or group[0].get("num_chips") or 1
        fit, fail = largest_fitting_batch(group)

        def fits(batch, size=size, topology=topology):
          status = measure(size, topology, batch)["status"]
          if status not in ("fits", "does_not_fit"):
            # Not a memory verdict: stop searching this group rather than count it as a failure.
            raise RuntimeError(f"batch {batch}: {status}")
          return status == "fits"

        try:
          # Double from the largest fit (or halve from the smallest failure) to bracket the limit.
          while fail is None and fit is not None and fit * 2 <= args.max_batch:
            if fits(fit * 2):
              fit *= 2
            else:
              fail = fit * 2
          while fit is None and fail is not None and fail // 2 >= step:
            if fits(fail // 2):
              fit = fail // 2
            else:
              fail //= 2
          for _ in range(args.bisect_steps):
            if fit is None or fail is None:
              break
            middle = (fit + fail) // 2 // step * step
            if middle in (fit, fail):
              break
            if fits(middle):
              fit = middle
            else:
              fail = middle
        except RuntimeError as e:
          print(f"{size} {topology}: search stopped, {e} (see {args.results}).")
  print(markdown_table(records))


if __name__ == "__main__":
  main()
