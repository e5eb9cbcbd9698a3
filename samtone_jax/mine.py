r"""Entry point mining hard negatives for a training set with a trained dual encoder.

  python -m samtone_jax.mine --gin_file=experiments/demo_samtone.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/stage1\" --gin.MINE_TASK=\"demo_manpages_train\" \
    --gin.MINE_OUTPUT_DIR=\"/tmp/stage1/mined\" [--gin.mining.MiningConfig.range_min=2] \
    [--gin.mining.MiningConfig.relative_margin=0.05] [--gin.mining.MiningConfig.num_negatives=4]

CHECKPOINT_PATH is a samtone_jax run or checkpoint directory, or public weights (a
sentence-transformers GTR directory, a Hugging Face T5 directory), loaded by
`evaluation.runner.load_model`. The experiment's gin files give the model (and
TASK_FEATURE_LENGTHS, the lengths the texts are tokenised to); `gin/runs/mine.gin` (parsed before
them) binds `mining.mine_to_directory` and the filters (`mining.MiningConfig`: num_negatives,
range_min, range_max, max_score, relative_margin, sampling_strategy, seed,
skip_fingerprint_duplicates). MINE_TASK is a registered training set
with a corpus and qrels: "beir_<name>_train" for a BEIR directory with qrels/train.tsv (under
$SAMTONE_DATA_DIR/beir/), "msmarco_passage_train" or "demo_manpages_train". Writes MINE_OUTPUT_DIR/hard_negatives.jsonl
and manifest.json (format in `samtone_jax/evaluation/mining.py`), which
`tasks.hard_negatives.register_mined_task` turns into a training task with negatives.

Bad input (a missing checkpoint, a task without a corpus, range_min >= range_max, a positive
that is not in the corpus) exits with status 1 and a message naming what to fix, before anything
is written. Flags as in `samtone_jax.main`.
"""

from collections.abc import Sequence

from absl import app

from samtone_jax import cli

MINE_RUN_GIN = "runs/mine.gin"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Bad input (MiningInputError, data and checkpoint errors) is an errors.UserError, which
  # `cli.run` reports as one message with exit status 1.
  cli.run_configured_entry_point(MINE_RUN_GIN, "samtone_jax.evaluation.mining",
                                      "mine_to_directory")


def console_main() -> None:
  """The `samtone-mine` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
