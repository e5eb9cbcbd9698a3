"""The demos: in-batch softmax vs SamToNe on the embedded man-page dataset, with significance.

`make demo` trains the tiny SDE dual encoder with each loss through the same `trainer.train` and
the real gin files (`gin/experiments/demo_in_batch.gin`, `gin/experiments/demo_samtone.gin`:
same seed, steps and data order), evaluates both on the test queries, prints a table beside
BM25 and the untrained model, a paired significance test of SamToNe vs in-batch on each metric
(`evaluation.metrics.compare_runs`, t-test and bootstrap, recomputed from the TREC run files the
runs wrote) with one line saying whether the difference is significant at 0.05, and draws the
embedding probes of both runs (`analysis.probes.probe_checkpoint`).

`make demo-architectures` (`--architectures`) does the same for SDE, ADE and ADE-SPL (six runs,
same seed and steps) and draws the probes of ADE in-batch vs ADE SamToNe.

  python -m samtone_jax.demo [--architectures] [--seeds=N] [--train_steps=N] [--tune]
      [--binding="LEARNING_RATE = 5e-3"]
      [--output_dir=demo_runs/<timestamp>]

With --seeds=N every run is repeated with SEED = 0 .. N-1 (model init, dropout and data order):
the table shows the mean over seeds and the tests pair the per-query results of all seeds
(query q of seed s against query q of seed s). Everything (checkpoints, TensorBoard logs,
metrics.jsonl, TREC run files, results.json, results.md, probe PNGs) lands in the printed
output directory.
"""

from collections.abc import Sequence
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax

from samtone_jax import bm25
from samtone_jax import cli
from samtone_jax import gin_config
from samtone_jax import io_utils

OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the runs and results go (default demo_runs/<UTC timestamp>).")
TRAIN_STEPS = flags.DEFINE_integer("train_steps", None,
                                   "Override TRAIN_STEPS of the demo experiments.")
SEEDS = flags.DEFINE_integer("seeds", 1, "Train every run with SEED = 0 .. seeds-1; the table "
                             "averages them and the tests pool their per-query results.")
TUNE = flags.DEFINE_bool(
    "tune", False, "Train on the train pages minus a held-out tenth (demo_manpages_tuning) and "
    "evaluate on that tenth (demo_manpages_dev): for choosing hyper-parameters.")
BINDINGS = flags.DEFINE_multi_string(
    "binding", [], "Extra gin binding for every run, e.g. --binding='LEARNING_RATE = 5e-3'.")
ARCHITECTURES = flags.DEFINE_bool(
    "architectures", False, "SDE, ADE and ADE-SPL, each with both losses (make "
    "demo-architectures), instead of SDE only (make demo).")

# (label, run name, experiment gin file); the first is the baseline of the paired tests.
LOSSES = (("in-batch softmax", "in_batch", "experiments/demo_in_batch.gin"),
          ("SamToNe", "samtone", "experiments/demo_samtone.gin"))
ARCHITECTURE_NAMES = {"sde": "SDE", "ade": "ADE", "ade_ste": "ADE-STE", "ade_fte": "ADE-FTE",
                      "ade_spl": "ADE-SPL"}
EVAL_SET = "demo_manpages_test"
# Hyper-parameters are chosen on held-out train pages, never on the test queries (--tune).
TUNING_BINDINGS = ('MIXTURE_OR_TASK_NAME = "demo_manpages_tuning"',
                   'EVAL_TASKS = ["demo_manpages_dev"]')
TUNING_EVAL_SET = "demo_manpages_dev"
METRICS = ("mrr@10", "recall@10", "ndcg@10")
ALPHA = 0.05
TESTS = ("t-test", "bootstrap")


@dataclasses.dataclass(frozen=True)
class RunResult:
  """One trained run: its directory, config, eval metrics and TREC run file of the eval set."""

  model_dir: str
  model_config: Any
  metrics: dict[str, float]
  run_file: str


def train_experiment(gin_file: str, model_dir: str, extra_bindings: Sequence[str] = ()):
  """Parses one experiment's gin files from scratch and runs `trainer.train`; returns its
  TrainResult. The config stays parsed (the caller reads its macros) until the next run."""
  return gin_config.run_from_gin([gin_file], [f"MODEL_DIR = {model_dir!r}", *extra_bindings],
                                 keep_config=True)


def _metric_name(metric: str) -> str:
  names = {"mrr": "MRR", "recall": "Recall", "ndcg": "nDCG", "p": "P"}
  base = metric.split("@")[0]
  return names.get(base, metric) + metric[len(base):]


def format_table(rows: Sequence[tuple[str, dict[str, float]]], metrics: Sequence[str]) -> str:
  """A Markdown table: one row per system, one column per metric."""
  header = "| system | " + " | ".join(_metric_name(m) for m in metrics) + " |"
  lines = [header, "|" + " --- |" * (len(metrics) + 1)]
  for name, values in rows:
    lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
  return "\n".join(lines)


def pool_seeds(qrels: dict[str, dict[str, int]], runs: Sequence[dict[str, dict[str, float]]]
               ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
  """One (qrels, run) over every seed: query q of seed s becomes query "s/q".

  Args:
    qrels: {query_id: {doc_id: grade}} of the eval set.
    runs: one run {query_id: {doc_id: score}} per seed, in seed order.
  """
  pooled_qrels = {f"{s}/{q}": judged for s in range(len(runs)) for q, judged in qrels.items()}
  pooled_run = {f"{s}/{q}": ranking for s, run in enumerate(runs) for q, ranking in run.items()}
  return pooled_qrels, pooled_run


def compare_losses(qrels: dict[str, dict[str, int]], baseline_run_files: Sequence[str],
                   candidate_run_files: Sequence[str], metrics: Sequence[str]
                   ) -> dict[str, dict[str, float]]:
  """Paired tests of a candidate (SamToNe) vs a baseline (in-batch) from their TREC run files.

  Args:
    qrels: the eval set's qrels.
    baseline_run_files, candidate_run_files: one run file per seed each, in seed order.
    metrics: metric names.

  Returns:
    {metric: {"baseline", "candidate", "difference" (candidate - baseline), "t-test",
    "bootstrap" (p-values), "num_pairs"}}.
  """
  from samtone_jax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import retrieval  # pylint: disable=g-import-not-at-top
  pooled_qrels, baseline = pool_seeds(qrels, [retrieval.read_trec_run(f)
                                              for f in baseline_run_files])
  _, candidate = pool_seeds(qrels, [retrieval.read_trec_run(f) for f in candidate_run_files])
  comparison = {}
  for metric in metrics:
    tests = {test: metrics_lib.compare_runs(pooled_qrels, candidate, baseline, metric, test=test)
             for test in TESTS}
    result = tests["t-test"]
    comparison[metric] = {"baseline": result["mean_b"], "candidate": result["mean_a"],
                          "difference": result["difference"], "num_pairs": len(pooled_qrels),
                          **{test: tests[test]["p_value"] for test in TESTS}}
  return comparison


def significance_line(name: str, comparison: dict[str, dict[str, float]],
                      alpha: float = ALPHA) -> str:
  """One line: per metric, SamToNe - in-batch, both p-values and the verdict at `alpha`."""
  parts = []
  for metric, c in comparison.items():
    significant = [test for test in TESTS if c[test] < alpha]
    verdict = ("significant" if len(significant) == len(TESTS) else
               "not significant" if not significant else f"significant by the {significant[0]} "
               "only")
    parts.append(f"{_metric_name(metric)} {c['difference']:+.4f} ({verdict}; t-test "
                 f"p={c['t-test']:.3g}, bootstrap p={c['bootstrap']:.3g})")
  num_pairs = next(iter(comparison.values()))["num_pairs"]
  return (f"{name}: SamToNe - in-batch softmax at {alpha} over {num_pairs} paired queries: "
          + "; ".join(parts) + ".")


def _run_file(model_dir: str, step: int, eval_set: str) -> str:
  """The TREC run file of `eval_set` that the trainer's final evaluation wrote."""
  return os.path.join(model_dir, "eval_results", str(step), f"{eval_set}.trec")


def run_demo(output_dir: str, train_steps: int | None = None, *, seeds: int = 1,
             architectures: Sequence[str] = ("sde",), probe_architecture: str | None = "sde",
             extra_bindings: Sequence[str] = (), with_untrained: bool = True,
             max_tsne_points: int = 1000, eval_set_name: str = EVAL_SET) -> dict[str, Any]:
  """Trains, evaluates, compares, probes and writes results.

  Args:
    output_dir: where everything goes; `<arch>_<loss>/seed<s>/` per run.
    train_steps: TRAIN_STEPS of every run (None: the experiments' own).
    seeds: runs per system, SEED = 0 .. seeds - 1.
    architectures: tower-sharing modes, each trained with both losses.
    probe_architecture: draw the probes of this mode's two runs (seed 0); None: no probes.
    extra_bindings: more gin bindings for every run (e.g. tiny sizes in tests).
    with_untrained: add the untrained model (the first architecture, seed 0's init) to the
      table.
    max_tsne_points: t-SNE sample per tower.
    eval_set_name: the set the runs evaluate on (their EVAL_TASKS; TUNING_EVAL_SET with
      TUNING_BINDINGS).

  Returns:
    {"metrics": {system: {metric: mean over seeds}}, "comparisons": {architecture: {metric:
    ...}} (see `compare_losses`), "significance": [lines], "probes": {system: summary}}.
  """
  from samtone_jax.analysis import probes  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  if seeds < 1:
    raise ValueError(f"--seeds={seeds}; expected at least 1.")
  io_utils.makedirs(output_dir)
  start = time.time()
  steps_binding = [] if train_steps is None else [f"TRAIN_STEPS = {train_steps}"]
  runs: dict[tuple[str, str], list[RunResult]] = {}
  first_result = None
  for architecture in architectures:
    for label, loss, gin_file in LOSSES:
      for seed in range(seeds):
        model_dir = os.path.join(output_dir, f"{architecture}_{loss}", f"seed{seed}")
        print(f"\n=== {ARCHITECTURE_NAMES[architecture]} with {label}, seed {seed} "
              f"({gin_file}) ===", flush=True)
        result = train_experiment(gin_file, model_dir, [
            f"config.DualEncoderConfig.tower_sharing = {architecture!r}", f"SEED = {seed}",
            *steps_binding, *extra_bindings])
        first_result = first_result or result
        step = int(result.state.step)
        runs.setdefault((architecture, loss), []).append(RunResult(
            model_dir, result.built.model.config,
            {m: result.eval_metrics[f"{eval_set_name}/{m}"] for m in METRICS},
            _run_file(model_dir, step, eval_set_name)))
        feature_lengths = gin_config.gin_macro("TASK_FEATURE_LENGTHS")

  eval_set = eval_sets.get_eval_set(eval_set_name)
  names = {loss: label for label, loss, _ in LOSSES}
  rows: list[tuple[str, dict[str, float]]] = [
      ("BM25 (rank-bm25, Okapi)", bm25.evaluate_bm25(eval_set, METRICS))]
  if with_untrained:
    # Same architecture and seed: the parameters the first runs started from.
    untrained = first_result.built.init_state(jax.random.PRNGKey(0))
    untrained_metrics = runner.evaluate_params(
        first_result.built.model, untrained.params, first_result.mesh, [eval_set_name],
        metrics=list(METRICS), feature_lengths=feature_lengths)
    rows.append((f"{ARCHITECTURE_NAMES[architectures[0]]}, untrained (same init)",
                 {m: untrained_metrics[f"{eval_set_name}/{m}"] for m in METRICS}))
  comparisons, lines = {}, []
  for architecture in architectures:
    for _, loss, _ in LOSSES:
      results = runs[(architecture, loss)]
      rows.append((f"{ARCHITECTURE_NAMES[architecture]}, {names[loss]}",
                   {m: sum(r.metrics[m] for r in results) / len(results) for m in METRICS}))
    (baseline, candidate) = (runs[(architecture, loss)] for _, loss, _ in LOSSES)
    comparisons[architecture] = compare_losses(
        eval_set.qrels, [r.run_file for r in baseline], [r.run_file for r in candidate], METRICS)
    lines.append(significance_line(ARCHITECTURE_NAMES[architecture], comparisons[architecture]))

  probe_summaries = {}
  if probe_architecture is not None:
    print(f"\n=== Embedding probes of {ARCHITECTURE_NAMES[probe_architecture]} ===", flush=True)
    for _, loss, _ in LOSSES:
      run = runs[(probe_architecture, loss)][0]
      name = f"{probe_architecture}_{loss}"
      probe_summaries[name] = probes.probe_checkpoint(
          run.model_dir, run.model_config, eval_set_name, os.path.join(output_dir, "probes", name),
          feature_lengths=feature_lengths, max_tsne_points=max_tsne_points,
          title=f"{ARCHITECTURE_NAMES[probe_architecture]}, {names[loss]}")

  table = format_table(rows, METRICS)
  seeds_text = f", mean of {seeds} seeds" if seeds > 1 else ""
  summary = (f"Demo: {len(eval_set.qrels)} queries of {eval_set_name} against "
             f"{len(eval_set.corpus)} man-page documents{seeds_text}; "
             f"{time.time() - start:.0f} s in all.")
  probe_lines = [f"Probes of {name}: {s['tsne_png']}, {s['top1_distances_png']}"
                 for name, s in probe_summaries.items()]
  text = "\n\n".join([summary, table, "\n".join(lines)] + (["\n".join(probe_lines)]
                                                           if probe_lines else []))
  results = {"metrics": dict(rows), "comparisons": comparisons, "significance": lines,
             "probes": probe_summaries, "seeds": seeds,
             "runs": {f"{a}_{l}": [{"model_dir": r.model_dir, "run_file": r.run_file,
                                     "metrics": r.metrics} for r in rs]
                      for (a, l), rs in runs.items()}}
  with io_utils.open_file(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with io_utils.open_file(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(text + "\n")
  print("\n" + text, flush=True)
  print(f"\nResults, checkpoints and TensorBoard logs: {io_utils.abspath(output_dir)}\n"
        f"  tensorboard --logdir {io_utils.abspath(output_dir)}", flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_demo_from_flags()
  if SEEDS.value < 1:
    raise app.UsageError(f"--seeds={SEEDS.value}; expected at least 1.")
  output_dir = OUTPUT_DIR.value or os.path.join(
      "demo_runs", datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
  bindings = list(BINDINGS.value)
  eval_set_name = EVAL_SET
  if TUNE.value:
    bindings = [*TUNING_BINDINGS, *bindings]
    eval_set_name = TUNING_EVAL_SET
  if ARCHITECTURES.value:
    run_demo(output_dir, TRAIN_STEPS.value, seeds=SEEDS.value,
             architectures=("sde", "ade", "ade_spl"), probe_architecture="ade",
             with_untrained=False, extra_bindings=bindings, eval_set_name=eval_set_name)
  else:
    run_demo(output_dir, TRAIN_STEPS.value, seeds=SEEDS.value, extra_bindings=bindings,
             eval_set_name=eval_set_name)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "JAX_PLATFORMS" not in os.environ:
    print("Note: JAX_PLATFORMS is unset; `make demo` sets JAX_PLATFORMS=cpu.", file=sys.stderr)
  cli.run(main, hidden_flags=cli.DEMO_HIDDEN_FLAGS)
