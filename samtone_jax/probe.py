r"""Entry point drawing the SamToNe paper's embedding probes of a checkpoint.

  python -m samtone_jax.probe --gin_file=gin/experiments/demo_samtone.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/run\" --gin.PROBE_SET=\"demo_manpages_test\" \
    --gin.PROBE_OUTPUT_DIR=\"/tmp/run/probes\"

Embeds the set's queries (query tower) and corpus (document tower) and writes to
PROBE_OUTPUT_DIR: tsne.png (t-SNE of both towers), top1_distances.png (query -> nearest
document, query -> nearest other query, document -> nearest other document) and probes.json
(the mean and median of each distance distribution, the counts and the two PNG paths). Large
sets: --gin.PROBE_MAX_QUERIES=N / --gin.PROBE_MAX_DOCUMENTS=N embed a seeded sample.
`gin/runs/probe.gin` (parsed before the experiment's files) binds `probe()`; the library is
`samtone_jax.analysis.probes.probe_checkpoint`. Flags as in `samtone_jax.main`.
"""

from collections.abc import Sequence
import importlib
from typing import Any

from absl import app

from samtone_jax import cli
from samtone_jax.models import config as model_config_lib

PROBE_RUN_GIN = "runs/probe.gin"


def probe(*, checkpoint_path: str, model: model_config_lib.DualEncoderConfig, eval_set: str,
          output_dir: str, feature_lengths: dict[str, int] | None = None,
          max_queries: int | None = None, max_documents: int | None = None,
          max_tsne_points: int = 2000, seed: int = 0, mesh_shape: tuple[int, int] = (-1, 1),
          tasks_module: str = "samtone_jax.tasks.all") -> dict[str, Any]:
  """Runs `probes.probe_checkpoint` and prints where the pictures are.

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory.
    model: the architecture the checkpoint was trained with.
    eval_set: a registered evaluation set name (PROBE_SET).
    output_dir: where the PNGs and probes.json go (PROBE_OUTPUT_DIR).
    feature_lengths: {"queries": Lq, "passages": Lp} (EVAL_FEATURE_LENGTHS); None: the set's.
    max_queries, max_documents: embed at most this many of each (seeded sample); None: all.
    max_tsne_points, seed: t-SNE sample size per tower and seed.
    mesh_shape: (data, model) mesh sizes.
    tasks_module: imported to register the evaluation sets.

  Returns:
    The summary written to probes.json.
  """
  importlib.import_module(tasks_module)
  from samtone_jax.analysis import probes  # pylint: disable=g-import-not-at-top
  summary = probes.probe_checkpoint(
      checkpoint_path, model, eval_set, output_dir, feature_lengths=feature_lengths,
      max_queries=max_queries, max_documents=max_documents, max_tsne_points=max_tsne_points,
      seed=seed, mesh_shape=mesh_shape)
  for name in ("query_to_document", "query_to_query", "document_to_document"):
    print(f"top-1 distance {name}: mean {summary[f'mean_{name}']:.4f}, "
          f"median {summary[f'median_{name}']:.4f}", flush=True)
  print(f"t-SNE: {summary['tsne_png']}\ntop-1 distances: {summary['top1_distances_png']}",
        flush=True)
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_configured_entry_point(PROBE_RUN_GIN, "samtone_jax.probe", "probe")


def console_main() -> None:
  """The `samtone-probe` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
