r"""The SKILL demo (`make demo-skill`): does infusing a knowledge graph help closed-book QA?

Trains a tiny T5 encoder-decoder on the embedded WordNet one-hop questions alone, and the same
model first trained on the WordNet KG's masked triples (SKILL) then on the same questions, and
prints the exact match of both on the questions' test split (and dev, where steps and learning
rates were chosen). A few minutes on a 2-core CPU.

  python -m samtone_jax.demo_skill [--output_dir=demo_runs/skill_<timestamp>] [--tune]
      [--binding="TRAIN_STEPS = 500"] [--infuse_steps=N] [--infuse_learning_rate=X]

--tune skips the test split (for choosing hyper-parameters on dev). Run directories, predictions
(JSON lines) and results.json land in the printed output directory.
"""

from collections.abc import Sequence
import datetime
import os

from absl import app
from absl import flags

from samtone_jax import cli
from samtone_jax import skill_demo

OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the runs and results go (default demo_runs/skill_<UTC timestamp>).")
TUNE = flags.DEFINE_bool("tune", False, "Score the dev split only (choosing hyper-parameters).")
BINDINGS = flags.DEFINE_multi_string(
    "binding", [], "Extra gin binding for both QA runs, e.g. --binding='TRAIN_STEPS = 500'.")
INFUSE_STEPS = flags.DEFINE_integer("infuse_steps", skill_demo.INFUSE_STEPS,
                                    "TRAIN_STEPS of the infusion run.")
INFUSE_LEARNING_RATE = flags.DEFINE_float("infuse_learning_rate", skill_demo.INFUSE_LEARNING_RATE,
                                          "LEARNING_RATE of the infusion run.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_demo_from_flags()
  output_dir = OUTPUT_DIR.value or os.path.join(
      "demo_runs", "skill_" + datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y%m%d_%H%M%S"))
  results = skill_demo.run_skill_demo(
      output_dir, qa_bindings=BINDINGS.value, infuse_steps=INFUSE_STEPS.value,
      infuse_learning_rate=INFUSE_LEARNING_RATE.value, evaluate_test=not TUNE.value)
  print(skill_demo.format_results(results), flush=True)
  print(f"Runs and predictions: {os.path.abspath(output_dir)}", flush=True)


def console_main() -> None:
  cli.run(main, hidden_flags=cli.DEMO_HIDDEN_FLAGS)


if __name__ == "__main__":
  console_main()
