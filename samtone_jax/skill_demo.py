"""The SKILL demo's runs: closed-book QA alone vs. knowledge-infused then fine-tuned.

Three `trainer.train` runs of the real gin files (`gin/experiments/skill_wordnet_demo.gin`):
  qa_only    the tiny T5 trained on demo_wordnet_qa's training questions alone;
  infuse     the same model trained on the WordNet KG's masked triples (`INFUSE_TASK`);
  skill_qa   `qa_only`'s run, started from `infuse`'s parameters (INITIAL_CHECKPOINT_PATH,
             params only; the optimizer starts fresh).
Both QA runs have the same seed, steps and data order, and are scored by greedy decoding + exact
match on the dev split (at the end of training) and on the test split (after). The entry point
is `samtone_jax/demo_skill.py` (`make demo-skill`).
"""

from collections.abc import Sequence
import json
import os
from typing import Any


from samtone_jax import gin_config
from samtone_jax import io_utils
from samtone_jax.evaluation import closed_book_qa

EXPERIMENT = "experiments/skill_wordnet_demo.gin"
INFUSE_TASK = "demo_wordnet_skill"
DEV_SET = "demo_wordnet_qa:dev"
TEST_SET = "demo_wordnet_qa:test"
# Chosen on DEV_SET (README "What make demo-skill does"); the QA runs use the experiment's own
# TRAIN_STEPS / LEARNING_RATE.
INFUSE_STEPS = 1200
INFUSE_LEARNING_RATE = 3e-3


def train_experiment(model_dir: str, bindings: Sequence[str] = ()):
  """Parses the demo experiment (plus `bindings`) from scratch and runs `trainer.train`;
  returns its TrainResult."""
  return gin_config.run_from_gin([EXPERIMENT], [f"MODEL_DIR = {model_dir!r}", *bindings])


def test_exact_match(result, eval_set: str, output_dir: str) -> float:
  """Exact match of a finished run on `eval_set` (predictions written to `output_dir`)."""
  model = result.built.model
  lengths = {"inputs": 32, "targets": 16}
  scores = closed_book_qa.evaluate_params(
      model, result.state.params["model"], result.mesh, [eval_set],
      input_length=lengths["inputs"], max_decode_length=lengths["targets"],
      output_dir=output_dir)
  return scores[f"{eval_set}/{closed_book_qa.METRIC}"]


def run_skill_demo(output_dir: str, *, qa_bindings: Sequence[str] = (),
                   infuse_bindings: Sequence[str] = (), infuse_steps: int = INFUSE_STEPS,
                   infuse_learning_rate: float = INFUSE_LEARNING_RATE,
                   evaluate_test: bool = True) -> dict[str, Any]:
  """Trains the three runs and scores both QA models.

  Args:
    output_dir: `qa_only/`, `infuse/`, `skill_qa/` run directories and results.json go here.
    qa_bindings: extra gin bindings of both QA runs (e.g. TRAIN_STEPS when tuning).
    infuse_bindings: extra gin bindings of the infusion run.
    infuse_steps, infuse_learning_rate: the infusion run's TRAIN_STEPS and LEARNING_RATE.
    evaluate_test: also score the test split (off while choosing hyper-parameters).

  Returns:
    {"qa_only": {"dev": EM, ["test": EM]}, "skill_qa": {...}, "infuse_loss": final train loss}.
  """
  io_utils.makedirs(output_dir)
  results: dict[str, Any] = {}
  qa = train_experiment(os.path.join(output_dir, "qa_only"), qa_bindings)
  infuse = train_experiment(
      os.path.join(output_dir, "infuse"),
      [f"MIXTURE_OR_TASK_NAME = {INFUSE_TASK!r}", "EVAL_TASKS = []",
       f"TRAIN_STEPS = {infuse_steps}", f"LEARNING_RATE = {infuse_learning_rate}",
       *infuse_bindings])
  results["infuse_loss"] = infuse.train_metrics.get("loss")
  skill = train_experiment(
      os.path.join(output_dir, "skill_qa"),
      [f"INITIAL_CHECKPOINT_PATH = {os.path.join(output_dir, 'infuse')!r}", *qa_bindings])
  for name, result in (("qa_only", qa), ("skill_qa", skill)):
    scores = {"dev": result.eval_metrics[f"{DEV_SET}/{closed_book_qa.METRIC}"]}
    if evaluate_test:
      scores["test"] = test_exact_match(result, TEST_SET,
                                        os.path.join(output_dir, name, "test_predictions"))
    results[name] = scores
  with io_utils.open_file(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  return results


def format_results(results: dict[str, Any]) -> str:
  """A small table of exact match (percent) per model and split."""
  splits = [s for s in ("dev", "test") if s in results["qa_only"]]
  lines = ["model                          " + "  ".join(f"EM {s:>4}" for s in splits)]
  for label, name in (("T5, QA only", "qa_only"), ("T5, SKILL-infused + QA", "skill_qa")):
    lines.append(f"{label:<31}" + "  ".join(f"{100 * results[name][s]:7.2f}" for s in splits))
  return "\n".join(lines)
