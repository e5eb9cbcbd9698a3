r"""Entry point for closed-book QA predictions of an encoder-decoder checkpoint, with exact match.

  python -m samtone_jax.predict --gin_file=experiments/skill_wordnet_demo.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/run\" --gin.EVAL_TASKS='["demo_wordnet_qa:test"]' \
    [--gin.PREDICT_OUTPUT_DIR=\"/tmp/run/predict\"] [--gin.BEAM_SIZE=4]

The experiment's gin files give the model; `gin/runs/predict.gin` (parsed before them) binds
`predict()`. CHECKPOINT_PATH is a run directory (latest checkpoint), its `checkpoints/` directory
or one `checkpoints/<step>` directory. EVAL_TASKS are closed-book QA tasks "TASK[:SPLIT]"
(default split test). Questions are truncated to TASK_FEATURE_LENGTHS["inputs"] tokens and
answers decoded to TASK_FEATURE_LENGTHS["targets"] (greedy; beam search with BEAM_SIZE > 1).
Writes <PREDICT_OUTPUT_DIR>/<task>_<split>.predictions.jsonl (question, prediction, answers,
correct) and metrics.json, and prints each set's exact match. Flags as in `samtone_jax.main`.
"""

from collections.abc import Sequence
import importlib

from absl import app

from samtone_jax import errors
from samtone_jax import cli
from samtone_jax.evaluation import closed_book_qa
from samtone_jax.evaluation import runner
from samtone_jax.models import seq2seq_model

PREDICT_RUN_GIN = "runs/predict.gin"


def predict(*, checkpoint_path: str, model: seq2seq_model.EncoderDecoderModel,
            eval_sets: Sequence[str], feature_lengths: dict[str, int],
            output_dir: str | None = None, beam_size: int = 1, batch_size: int = 64,
            mesh_shape: tuple[int, int] = (-1, 1),
            tasks_module: str = "samtone_jax.tasks.all") -> dict[str, float]:
  """Decodes every question of each eval set with the checkpoint; returns exact match.

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory.
    model: the encoder-decoder the checkpoint was trained with.
    eval_sets: closed-book QA sets "TASK[:SPLIT]" (EVAL_TASKS).
    feature_lengths: {"inputs": Li, "targets": Lt}: question length and decode length.
    output_dir: where predictions and metrics.json go; None: nowhere.
    beam_size: 1 greedy, otherwise beam search.
    batch_size: questions per decode call.
    mesh_shape: (data, model) mesh sizes.
    tasks_module: imported to register the tasks.

  Returns:
    {"<eval set>/exact_match": fraction in [0, 1]}.
  """
  if not eval_sets:
    raise errors.ConfigError("No evaluation sets: set EVAL_TASKS, e.g. "
                             "--gin.EVAL_TASKS='[\"demo_wordnet_qa:test\"]'")
  importlib.import_module(tasks_module)
  closed_book_qa.check_eval_sets(eval_sets)  # before the model is loaded
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  results = closed_book_qa.evaluate_params(
      model, loaded.params["model"], loaded.mesh, eval_sets,
      input_length=feature_lengths["inputs"], max_decode_length=feature_lengths["targets"],
      output_dir=output_dir, batch_size=batch_size, beam_size=beam_size)
  for name, value in sorted(results.items()):
    print(f"{name}: {value:.4f}", flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_configured_entry_point(PREDICT_RUN_GIN, "samtone_jax.predict", "predict")


def console_main() -> None:
  """The `samtone-predict` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
