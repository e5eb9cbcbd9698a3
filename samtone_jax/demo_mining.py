r"""The multi-stage demo (`make demo-mining`): stage 1 -> mine hard negatives -> stage 2.

On the embedded man-page dataset, with the real gin files:

  1. stage 1: the tiny SDE dual encoder trained with SamToNe (`experiments/demo_samtone.gin`), or
     an existing run given with --stage1_dir (e.g. the `samtone` run of `make demo`);
  2. mining: its checkpoint mines hard negatives for the train queries (`runs/mine.gin`,
     MINE_TASK="demo_manpages_train", the filters below) into <output_dir>/mined;
  3. stage 2: initialised from stage 1 (params only), SamToNe with the mined negatives
     (`experiments/demo_samtone_mined.gin`);
  4. control: the same continuation of stage 1 (same steps and schedule) without negatives, so
     that the table separates the effect of the negatives from that of more training.

It prints MRR@10, Recall@10 and nDCG@10 on the test queries and a paired t-test per metric
(`metrics.compare_runs`, over the per-query values of the runs' TREC files):

  python -m samtone_jax.demo_mining [--output_dir=demo_runs/mining-<timestamp>] \
    [--stage1_dir=demo_runs/<timestamp>/samtone] [--stage1_steps=N] [--stage2_steps=N]
"""

from collections.abc import Sequence
import datetime
import json
import os
import sys
import time

from absl import app
from absl import flags

from samtone_jax import cli
from samtone_jax import gin_config
from samtone_jax import io_utils

OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the runs and results go (default demo_runs/mining-<UTC timestamp>).")
STAGE1_DIR = flags.DEFINE_string(
    "stage1_dir", None, "An existing demo_samtone.gin run to start from (default: train one).")
STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", None,
                                    "Override TRAIN_STEPS of stage 1 (when it is trained here).")
STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", None,
                                    "Override TRAIN_STEPS of stage 2 and the control.")

STAGE1_GIN = "experiments/demo_samtone.gin"
STAGE2_GIN = "experiments/demo_samtone_mined.gin"
MINE_GIN = "runs/mine.gin"
MINE_TASK = "demo_manpages_train"
EVAL_SET = "demo_manpages_test"
METRICS = ("mrr@10", "recall@10", "ndcg@10")
# The demo's filters: skip the closest non-positive page (man pages of one family often share
# their description almost word for word) and draw the negatives at random from the 30 closest.
# No relative_margin: the tiny model's scores crowd into [0.8, 1] (see the manifest's
# histograms), so a 5% margin dropped 59k of 65k candidates and left 1,825 of 2,336 queries
# without negatives in a trial run.
MINE_BINDINGS = ("mining.MiningConfig.num_negatives = 4", "mining.MiningConfig.range_min = 1",
                 "mining.MiningConfig.range_max = 30",
                 'mining.MiningConfig.sampling_strategy = "random"')


# The control mirrors demo_samtone_mined.gin's schedule on top of demo_samtone.gin.
CONTROL_BINDINGS = ("TRAIN_STEPS = 150", "LEARNING_RATE = 1e-3", "WARMUP_STEPS = 15",
                    "trainer.LoopConfig.checkpoint_period = 150")


def _train(gin_file: str, model_dir: str, bindings: Sequence[str]):
  return gin_config.run_from_gin([gin_file], [f"MODEL_DIR = {model_dir!r}", *bindings])


def _final_run(model_dir: str) -> dict[str, dict[str, float]]:
  """The TREC run of the test set written by the run's last evaluation."""
  from samtone_jax.evaluation import retrieval  # pylint: disable=g-import-not-at-top
  results = os.path.join(model_dir, "eval_results")
  steps = ([int(step) for step in io_utils.listdir(results) if step.isdigit()]
           if io_utils.isdir(results) else [])
  path = os.path.join(results, str(max(steps, default=0)), f"{EVAL_SET}.trec")
  if not io_utils.exists(path):
    raise FileNotFoundError(f"{model_dir} has no evaluation run of {EVAL_SET} ({path}); pass a "
                            f"run of {STAGE1_GIN} as --stage1_dir, or none to train one.")
  return retrieval.read_trec_run(path)


def _table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
  lines = ["| system | " + " | ".join(METRICS) + " |", "|" + " --- |" * (len(METRICS) + 1)]
  for name, values in rows:
    lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |")
  return "\n".join(lines)


def run_demo(output_dir: str, stage1_dir: str | None = None, stage1_steps: int | None = None,
             stage2_steps: int | None = None) -> dict:
  """Runs the four steps; writes and returns {"metrics": ..., "comparisons": ..., "mining": ...}."""
  from samtone_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import mining  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  io_utils.makedirs(output_dir)
  start = time.time()
  steps = [] if stage2_steps is None else [f"TRAIN_STEPS = {stage2_steps}"]
  if stage1_dir is None:
    stage1_dir = os.path.join(output_dir, "stage1")
    print(f"\n=== Stage 1: SamToNe from scratch ({STAGE1_GIN}) ===", flush=True)
    _train(STAGE1_GIN, stage1_dir, [] if stage1_steps is None else
           [f"TRAIN_STEPS = {stage1_steps}", "trainer.LoopConfig.checkpoint_period = 1000"])

  mined_dir = os.path.join(output_dir, "mined")
  print(f"\n=== Mining hard negatives for {MINE_TASK} with {stage1_dir} ===", flush=True)
  manifest = gin_config.run_from_gin(
      [MINE_GIN, STAGE1_GIN],
      [f"CHECKPOINT_PATH = {stage1_dir!r}", f"MINE_TASK = {MINE_TASK!r}",
       f"MINE_OUTPUT_DIR = {mined_dir!r}", *MINE_BINDINGS], mining.mine_to_directory)

  print(f"\n=== Stage 2: SamToNe + mined negatives, from stage 1 ({STAGE2_GIN}) ===", flush=True)
  stage2_dir = os.path.join(output_dir, "stage2")
  _train(STAGE2_GIN, stage2_dir, [f"INITIAL_CHECKPOINT_PATH = {stage1_dir!r}",
                                  f"HARD_NEGATIVES_PATH = {mined_dir!r}", *steps])
  # The control continues stage 1 exactly like stage 2 (steps, schedule) but without negatives.
  print("\n=== Control: the same continuation of stage 1 without negatives ===", flush=True)
  control_dir = os.path.join(output_dir, "control")
  _train(STAGE1_GIN, control_dir, [f"INITIAL_CHECKPOINT_PATH = {stage1_dir!r}",
                                   *CONTROL_BINDINGS, *steps])

  qrels = eval_sets.get_eval_set(EVAL_SET).qrels
  runs = {"stage 1": _final_run(stage1_dir), "stage 2 (mined negatives)": _final_run(stage2_dir),
          "control (stage 1 + same steps, no negatives)": _final_run(control_dir)}
  values = {name: metrics.evaluate_run(qrels, run, METRICS) for name, run in runs.items()}
  comparisons = {}
  for baseline in ("stage 1", "control (stage 1 + same steps, no negatives)"):
    comparisons[f"stage 2 vs {baseline}"] = {
        m: metrics.compare_runs(qrels, runs["stage 2 (mined negatives)"], runs[baseline], m)
        for m in METRICS}
  results = {"metrics": values, "comparisons": comparisons,
             "mining": {k: manifest[k] for k in ("filters", "dropped", "num_queries",
                                                 "num_negatives_written",
                                                 "num_queries_with_fewer_negatives")}}
  lines = [f"Multi-stage demo: {len(qrels)} test queries of {EVAL_SET}; "
           f"{time.time() - start:.0f} s in all.", "", _table(list(values.items())), ""]
  for name, per_metric in comparisons.items():
    lines.append(f"{name} (paired t-test over queries): " + ", ".join(
        f"{m} {c['difference']:+.4f} (p={c['p_value']:.3g})" for m, c in per_metric.items()))
  lines.append(f"\nMined {manifest['num_negatives_written']} negatives for "
               f"{manifest['num_queries']} train queries; dropped {manifest['dropped']}.")
  text = "\n".join(lines)
  with io_utils.open_file(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with io_utils.open_file(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(text + "\n")
  print("\n" + text, flush=True)
  print(f"\nRuns, mined negatives and results: {io_utils.abspath(output_dir)}", flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_demo_from_flags(binding_flag=None)
  output_dir = OUTPUT_DIR.value or os.path.join(
      "demo_runs", "mining-" + datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y%m%d-%H%M%S"))
  run_demo(output_dir, STAGE1_DIR.value, STAGE1_STEPS.value, STAGE2_STEPS.value)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "JAX_PLATFORMS" not in os.environ:
    print("Note: JAX_PLATFORMS is unset; `make demo-mining` sets JAX_PLATFORMS=cpu.",
          file=sys.stderr)
  cli.run(main, hidden_flags=cli.DEMO_HIDDEN_FLAGS)
