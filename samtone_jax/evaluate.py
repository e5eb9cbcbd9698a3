r"""Entry point for evaluating a checkpoint on retrieval evaluation sets.

  python -m samtone_jax.evaluate --gin_file=gin/experiments/demo_samtone.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/run\" [--gin.EVAL_TASKS='["demo_manpages_test"]'] \
    [--gin.EVAL_OUTPUT_DIR=\"/tmp/run/eval\"]

The experiment's gin files give the model; `gin/runs/eval.gin` (parsed before them) binds
`evaluate()`. CHECKPOINT_PATH is a run directory (latest checkpoint), its `checkpoints/`
directory, or one `checkpoints/<step>` directory; or a t5x MODEL_DIR / `checkpoint_<step>` directory
of this model (docs/t5x.md). Flags as in `samtone_jax.main`.
"""

from collections.abc import Sequence
import importlib
import json
import os

from absl import app

from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax import cli
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import runner
from samtone_jax.models import config as model_config_lib
from samtone_jax.tasks import eval_sets as eval_sets_lib

EVAL_RUN_GIN = "runs/eval.gin"


def evaluate(*, checkpoint_path: str, model: model_config_lib.DualEncoderConfig,
             eval_sets: Sequence[str], output_dir: str | None = None,
             metrics: Sequence[str] = (),
             feature_lengths: dict[str, int] | None = None,
             ignore_identical_ids: bool | None = None, mesh_shape: tuple[int, int] = (-1, 1),
             embeddings_dir: str | None = None, embedding_dtype: str = "float32",
             tasks_module: str = "samtone_jax.tasks.all") -> dict[str, float]:
  """Evaluates the checkpoint's dual encoder on each named evaluation set.

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory.
    model: the architecture the checkpoint was trained with.
    eval_sets: registered evaluation set names (EVAL_TASKS).
    output_dir: where run files, per-set JSON and `metrics.json` go; None: nowhere.
    metrics: metric names; empty: each set's protocol defaults.
    feature_lengths: {"queries": Lq, "passages": Lp} to tokenise to instead of each set's own
      lengths (EVAL_FEATURE_LENGTHS); None: the sets' lengths.
    ignore_identical_ids: drop a retrieved document whose id equals the query id
      (EVAL_IGNORE_IDENTICAL_IDS); None: each set's protocol decides (on for BEIR, as BEIR does).
    mesh_shape: (data, model) mesh sizes.
    embeddings_dir: where to stream each set's corpus embeddings as .npy shards (local or gs://),
      searched from there, for corpora whose embeddings do not fit in host memory
      (EVAL_EMBEDDINGS_DIR); None: in memory. On several hosts each host encodes, writes and
      searches only its slice of each corpus, so a directory local to each host works.
    embedding_dtype: "float32" or "bfloat16": how corpus embeddings are stored, in memory or in
      the shards (EVAL_EMBEDDING_DTYPE); the search accumulates in float32.
    tasks_module: imported to register the evaluation sets.

  Returns:
    {"<eval set>/<metric>": value}.
  """
  if not eval_sets:
    raise errors.ConfigError("No evaluation sets: set EVAL_TASKS, e.g. "
                             "--gin.EVAL_TASKS='[\"demo_manpages_test\"]'")
  importlib.import_module(tasks_module)
  eval_sets_lib.check_registered(eval_sets)  # before the model is loaded
  encoding.embedding_dtype(embedding_dtype)  # a bad EVAL_EMBEDDING_DTYPE fails before loading
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  results = runner.evaluate_params(loaded.module, loaded.params, loaded.mesh, eval_sets,
                                   output_dir=output_dir, metrics=list(metrics) or None,
                                   feature_lengths=feature_lengths,
                                   ignore_identical_ids=ignore_identical_ids,
                                   embeddings_dir=embeddings_dir,
                                   embedding_dtype=embedding_dtype)
  if output_dir:
    io_utils.makedirs(output_dir)  # gs:// on a pod.
    with io_utils.open_file(os.path.join(output_dir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  for name, value in sorted(results.items()):
    print(f"{name}: {value:.4f}", flush=True)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_configured_entry_point(EVAL_RUN_GIN, "samtone_jax.evaluate", "evaluate")


def console_main() -> None:
  """The `samtone-evaluate` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
