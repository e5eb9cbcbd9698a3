"""The demo's table and significance line, on a 2-step, 1-layer version of `make demo`.

Reference: the per-seed TREC run files the runs wrote, read back and scored here with
`metrics.evaluate_run_per_query` / `compare_runs` on qrels pooled by hand (query q of seed s is
one pair), and the p-values' verdict at 0.05 decided here.
"""

import json
import os

import jax
import numpy as np
import pytest

from samtone_jax import demo
from samtone_jax.evaluation import metrics as metrics_lib
from samtone_jax.evaluation import retrieval
from samtone_jax.tasks import eval_sets

TINY = ("TRAIN_STEPS = 3", "BATCH_SIZE = 16", 'TASK_FEATURE_LENGTHS = {"queries": 8, "passages": 16}',
        "WARMUP_STEPS = 1", "config.T5Config.num_layers = 1",
        "trainer.LoopConfig.checkpoint_period = 3", "trainer.LoopConfig.log_period = 3")
SEEDS = 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  # A persistent compilation cache: the second seed's programs are the first seed's.
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    output_dir = str(tmp_path_factory.mktemp("demo"))
    results = demo.run_demo(output_dir, seeds=SEEDS, extra_bindings=TINY, max_tsne_points=100)
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
  return output_dir, results


def test_significance_equals_compare_runs_on_the_written_run_files(demo_run, capsys):
  output_dir, results = demo_run
  qrels = eval_sets.get_eval_set(demo.EVAL_SET).qrels
  files = {loss: [os.path.join(output_dir, f"sde_{loss}", f"seed{s}", "eval_results", "3",
                               f"{demo.EVAL_SET}.trec") for s in range(SEEDS)]
           for loss in ("in_batch", "samtone")}
  runs = {loss: [retrieval.read_trec_run(f) for f in paths] for loss, paths in files.items()}
  # Different seeds gave different models (init, dropout and data order).
  assert runs["samtone"][0] != runs["samtone"][1]
  pooled_qrels = {}
  pooled = {"in_batch": {}, "samtone": {}}
  for seed in range(SEEDS):
    for query_id, judged in qrels.items():
      pooled_qrels[(seed, query_id)] = judged
      for loss in pooled:
        pooled[loss][(seed, query_id)] = runs[loss][seed].get(query_id, {})
  pooled_qrels = {f"{s}|{q}": v for (s, q), v in pooled_qrels.items()}
  pooled = {loss: {f"{s}|{q}": v for (s, q), v in run.items()} for loss, run in pooled.items()}

  with open(os.path.join(output_dir, "results.json")) as f:
    written = json.load(f)
  comparison = written["comparisons"]["sde"]
  verdicts = []
  for metric in demo.METRICS:
    per_seed = {loss: [metrics_lib.evaluate_run(qrels, run, [metric])[metric] for run in rs]
                for loss, rs in runs.items()}
    for loss, label in (("in_batch", "SDE, in-batch softmax"), ("samtone", "SDE, SamToNe")):
      assert written["metrics"][label][metric] == pytest.approx(np.mean(per_seed[loss]),
                                                                abs=1e-9)
    expected = {test: metrics_lib.compare_runs(pooled_qrels, pooled["samtone"],
                                               pooled["in_batch"], metric, test=test)
                for test in ("t-test", "bootstrap")}
    c = comparison[metric]
    assert c["num_pairs"] == SEEDS * len(qrels)
    assert c["difference"] == pytest.approx(expected["t-test"]["difference"], abs=1e-12)
    assert c["t-test"] == pytest.approx(expected["t-test"]["p_value"], abs=1e-12)
    assert c["bootstrap"] == pytest.approx(expected["bootstrap"]["p_value"], abs=1e-12)
    verdicts.append((metric, expected["t-test"]["p_value"] < 0.05,
                     expected["bootstrap"]["p_value"] < 0.05))

  line = written["significance"][0]
  assert line == demo.significance_line("SDE", comparison)
  for metric, t_significant, bootstrap_significant in verdicts:
    part = line.split(demo._metric_name(metric) + " ", 1)[1]  # pylint: disable=protected-access
    if t_significant and bootstrap_significant:
      assert part.split("(", 1)[1].startswith("significant;")
    elif not (t_significant or bootstrap_significant):
      assert part.split("(", 1)[1].startswith("not significant;")
  with open(os.path.join(output_dir, "results.md")) as f:
    assert line in f.read()


def test_demo_draws_the_probes_of_both_runs(demo_run):
  output_dir, results = demo_run
  for loss in ("in_batch", "samtone"):
    summary = results["probes"][f"sde_{loss}"]
    assert summary["checkpoint_path"] == os.path.join(output_dir, f"sde_{loss}", "seed0")
    for key in ("tsne_png", "top1_distances_png"):
      assert os.path.getsize(summary[key]) > 1000
    with open(os.path.join(output_dir, "probes", f"sde_{loss}", "probes.json")) as f:
      assert json.load(f) == summary
  with open(os.path.join(output_dir, "results.md")) as f:
    text = f.read()
  assert f"Probes of sde_samtone: {results['probes']['sde_samtone']['tsne_png']}" in text
