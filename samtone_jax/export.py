r"""Entry point exporting a checkpoint to sentence-transformers / Hugging Face, a TF SavedModel or t5x.

  python -m samtone_jax.export --gin_file=gin/experiments/demo_samtone.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/run\" --gin.EXPORT_DIR=\"/tmp/run/export\" \
    [--gin.EXPORT_FORMAT=\"sentence_transformers\"|\"saved_model\"|\"t5x\"] \
    [--gin.EXPORT_OVERWRITE=True]

The experiment's gin files give the model, the training task (whose SentencePiece vocabulary
becomes the tokenizer) and TASK_FEATURE_LENGTHS (the token lengths texts are cut to);
`gin/runs/export.gin` (parsed before them) binds `export()`. CHECKPOINT_PATH is a run directory
(latest checkpoint), its `checkpoints/` directory, or one `checkpoints/<step>` directory; a t5x
MODEL_DIR / `checkpoint_<step>` directory of this model (docs/t5x.md); or public weights, read like
INITIAL_CHECKPOINT_PATH: a sentence-transformers GTR directory or a Hugging Face T5 directory.

  sentence_transformers  `SentenceTransformer(EXPORT_DIR)` loads it (ADE variants: a `Router`;
                         `encode_query` / `encode_document` pick the tower). Needs torch,
                         transformers >= 5 and sentence-transformers >= 6 (to load it too).
  saved_model            `tf.saved_model.load(EXPORT_DIR).signatures["encode_queries"]` /
                         `["encode_documents"]`: strings in, embeddings out.
  t5x                    EXPORT_DIR/checkpoint_0: a t5x checkpoint (parameters only, step 0) that
                         `python -m t5x.train` starts from with gin/t5x/initial_checkpoint.gin
                         and --gin.INITIAL_CHECKPOINT_PATH=\"EXPORT_DIR/checkpoint_0\".

EXPORT_DIR must be absent or empty (EXPORT_OVERWRITE=True replaces it once the new export is
complete); a failed export leaves nothing there. README.md in the export records the architecture,
the step, that step's eval metrics and the run's config.gin. Flags as in `samtone_jax.main`.
"""

from collections.abc import Sequence
import importlib
import sys

from absl import app

from samtone_jax import cli
from samtone_jax.models import config as model_config_lib

EXPORT_RUN_GIN = "runs/export.gin"


def export(*, checkpoint_path: str, model: model_config_lib.DualEncoderConfig, export_dir: str,
           task: str, feature_lengths: dict[str, int],
           export_format: str = "sentence_transformers", overwrite: bool = False,
           mesh_shape: tuple[int, int] = (-1, 1),
           tasks_module: str = "samtone_jax.tasks.all") -> str:
  """Exports the checkpoint's dual encoder (see the module docstring).

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory, a t5x
      checkpoint, or public weights (see the module docstring).
    model: the architecture the checkpoint was trained with.
    export_dir: the local output directory (EXPORT_DIR).
    task: the training task or mixture (MIXTURE_OR_TASK_NAME); its "queries" vocabulary is
      exported as the tokenizer (not read for "t5x").
    feature_lengths: {"queries": Lq, "passages": Lp} (TASK_FEATURE_LENGTHS).
    export_format: "sentence_transformers", "saved_model" or "t5x" (EXPORT_FORMAT).
    overwrite: replace a non-empty export_dir (EXPORT_OVERWRITE).
    mesh_shape: (data, model) mesh sizes to restore on.
    tasks_module: imported to register the task.

  Returns:
    The export directory.
  """
  from samtone_jax import exporting  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  if export_format not in exporting.FORMATS:
    raise exporting.ExportError(
        f"EXPORT_FORMAT={export_format!r}; expected one of {exporting.FORMATS}.")
  exporting.staging.check_export_dir(export_dir, overwrite)  # Before the slow work.
  if export_format == "sentence_transformers":  # A missing or too old torch stack fails here.
    from samtone_jax.exporting import sentence_transformers_dir  # pylint: disable=g-import-not-at-top
    sentence_transformers_dir.import_torch_stack()
  sentencepiece_model = None  # A t5x checkpoint holds no tokenizer.
  if export_format != "t5x":
    importlib.import_module(tasks_module)
    output_features = seqio.get_mixture_or_task(task).output_features
    if "queries" not in output_features:  # e.g. a SKILL encoder-decoder's inputs/targets
      raise exporting.ExportError(
          f"MIXTURE_OR_TASK_NAME={task!r} has the features {sorted(output_features)}, not a dual "
          "encoder's queries/passages: samtone-export writes dual encoders only (an "
          "encoder-decoder run has no export format); pass a dual-encoder experiment's gin files.")
    vocabulary = output_features["queries"].vocabulary
    sentencepiece_model = exporting.sentencepiece_model_of(vocabulary, task)
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  path = exporting.export_model(
      model, loaded.params["model"], step_dir=loaded.step_dir or checkpoint_path,
      sentencepiece_model=sentencepiece_model, max_seq_lengths=dict(feature_lengths),
      export_dir=export_dir, export_format=export_format, overwrite=overwrite)
  print(f"Exported {loaded.step_dir or checkpoint_path} as {export_format} to {path}", flush=True)
  if export_format == "t5x":
    print("Start a t5x run from it with --gin_file=gin/t5x/initial_checkpoint.gin "
          f'--gin.INITIAL_CHECKPOINT_PATH=\\"{path}/checkpoint_0\\" (docs/t5x.md).', flush=True)
  return path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from samtone_jax import exporting  # pylint: disable=g-import-not-at-top
  try:
    cli.run_configured_entry_point(EXPORT_RUN_GIN, "samtone_jax.export", "export")
  except exporting.ExportError as e:
    print(f"Export failed: {e}", file=sys.stderr)
    sys.exit(1)


def console_main() -> None:
  """The `samtone-export` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
