"""The demo (`make demo`): in-batch softmax vs SamToNe on the embedded man-page dataset.

Trains the tiny SDE dual encoder twice through the same `trainer.train` and the real gin files
(`gin/experiments/demo_in_batch.gin`, `gin/experiments/demo_samtone.gin`: same seed, steps and
data order), evaluates both on the test queries, and prints a table beside BM25 and the untrained
model:

  python -m samtone_jax.demo [--output_dir=demo_runs/<timestamp>] [--train_steps=N]

Everything (checkpoints, TensorBoard logs, metrics.jsonl, results.json, results.md) lands in the
printed output directory.
"""

from collections.abc import Sequence
import datetime
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from samtone_jax import bm25
from samtone_jax import io_utils
from samtone_jax import main as main_lib

OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the runs and results go (default demo_runs/<UTC timestamp>).")
TRAIN_STEPS = flags.DEFINE_integer("train_steps", None,
                                   "Override TRAIN_STEPS of the demo experiments.")

EXPERIMENTS = (("in-batch softmax", "in_batch", "experiments/demo_in_batch.gin"),
               ("SamToNe", "samtone", "experiments/demo_samtone.gin"))
EVAL_SET = "demo_manpages_test"
METRICS = ("mrr@10", "recall@10", "ndcg@10")


def train_experiment(gin_file: str, model_dir: str, extra_bindings: Sequence[str] = ()):
  """Parses one experiment's gin files from scratch and runs `trainer.train`; returns its
  TrainResult."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  main_lib.parse_gin([gin_file], [f"MODEL_DIR = {model_dir!r}", *extra_bindings])
  return gin.get_configurable(trainer.train)(config_text=gin.config_str())


def format_table(rows: Sequence[tuple[str, dict[str, float]]], metrics: Sequence[str]) -> str:
  """A Markdown table: one row per system, one column per metric."""
  names = {"mrr": "MRR", "recall": "Recall", "ndcg": "nDCG", "p": "P"}
  header = "| system | " + " | ".join(
      names.get(m.split("@")[0], m) + m[len(m.split("@")[0]):] for m in metrics) + " |"
  lines = [header, "|" + " --- |" * (len(metrics) + 1)]
  for name, values in rows:
    lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
  return "\n".join(lines)


def run_demo(output_dir: str, train_steps: int | None = None) -> dict[str, dict[str, float]]:
  """Trains, evaluates and writes results; returns {system: {metric: value}}."""
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  io_utils.makedirs(output_dir)
  extra = [] if train_steps is None else [f"TRAIN_STEPS = {train_steps}"]
  start = time.time()
  results: dict[str, dict[str, float]] = {}
  last = None
  for label, name, gin_file in EXPERIMENTS:
    print(f"\n=== Training the tiny SDE dual encoder with {label} ({gin_file}) ===", flush=True)
    last = train_experiment(gin_file, os.path.join(output_dir, name), extra)
    results[label] = {m: last.eval_metrics[f"{EVAL_SET}/{m}"] for m in METRICS}

  print("\n=== Untrained model and BM25 ===", flush=True)
  # Same architecture and seed: the parameters both runs started from.
  untrained = last.built.init_state(jax.random.PRNGKey(0))
  untrained_metrics = runner.evaluate_params(
      last.built.model, untrained.params, last.mesh, [EVAL_SET], metrics=list(METRICS),
      feature_lengths=main_lib.gin_macro("TASK_FEATURE_LENGTHS"))
  results["untrained (same init)"] = {m: untrained_metrics[f"{EVAL_SET}/{m}"] for m in METRICS}
  results["BM25"] = bm25.evaluate_bm25(eval_sets.get_eval_set(EVAL_SET), METRICS)

  order = ["BM25", "untrained (same init)", "in-batch softmax", "SamToNe"]
  table = format_table([(k, results[k]) for k in order], METRICS)
  eval_set = eval_sets.get_eval_set(EVAL_SET)
  summary = (f"Demo: {len(eval_set.qrels)} test queries of {EVAL_SET} against "
             f"{len(eval_set.corpus)} man-page documents; {time.time() - start:.0f} s in all.")
  with io_utils.open_file(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with io_utils.open_file(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(summary + "\n\n" + table + "\n")
  print("\n" + summary + "\n\n" + table, flush=True)
  print(f"\nResults, checkpoints and TensorBoard logs: {io_utils.abspath(output_dir)}\n"
        f"  tensorboard --logdir {io_utils.abspath(output_dir)}", flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  output_dir = OUTPUT_DIR.value or os.path.join(
      "demo_runs", datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
  run_demo(output_dir, TRAIN_STEPS.value)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "JAX_PLATFORMS" not in os.environ:
    print("Note: JAX_PLATFORMS is unset; `make demo` sets JAX_PLATFORMS=cpu.", file=sys.stderr)
  app.run(main)
