r"""Entry point for training: flags in t5x's spelling -> gin -> `trainer.train()`.

  python -m samtone_jax.main \
    --gin_file=gin/experiments/demo_samtone.gin \
    --gin.MODEL_DIR=\"/tmp/run\" --gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=64

Flags:
  --gin_file          repeatable; parsed in order (later files override earlier ones). Relative
                      paths are looked up in the current directory, then --gin_search_paths,
                      then the gin files shipped in the package, so `experiments/X.gin` and
                      `gin/experiments/X.gin` work from any directory, installed or not.
  --gin.NAME=VALUE    a gin binding (t5x's shorthand for --gin_bindings='NAME = VALUE'), applied
                      after the files; e.g. --gin.MODEL_DIR=\"/tmp/run\", --gin.BATCH_SIZE=64,
                      --gin.losses.LossConfig.same_tower_negatives=False.
  --gin_search_paths  comma-separated directories for gin files and includes; the repository's
                      gin/ directory is always searched.
  --tfds_data_dir     where TFDS datasets live (overrides seqio's default).
  --compilation_cache_dir  persistent XLA compilation cache (CPU/GPU: on by default in
                      ~/.cache/samtone_jax/jax_cache or $SAMTONE_COMPILATION_CACHE_DIR; '' or
                      'off' turns it off); a resumed or evaluated run skips compiling.
  plus samtone_jax.distributed's multi-host flags (--multiprocess_gpu, --coordinator_address,
  --process_count, --process_index).

The gin files bind `trainer.train` (see gin/runs/*.gin); the full config is written to
MODEL_DIR/config.gin once the configuration and the first batch of data have been checked.

Errors a user can fix (a wrong gin binding or file, a misspelled macro, bad data, a damaged
checkpoint, a run directory locked by another trainer, a non-finite loss) end every command with
one message on stderr naming the file / line / binding / step and what to do, and exit status 1;
`--verbose` or SAMTONE_DEBUG=1 adds the traceback. Any other exception is a bug and keeps its
traceback.
"""

from collections.abc import Sequence

from absl import app

from samtone_jax import cli
from samtone_jax import gin_config


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_from_flags()
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  # The trainer writes MODEL_DIR/config.gin once it holds the run directory's lock and has
  # checked the configuration and the data, so that a refused run leaves nothing behind.
  gin_config.call_configured(trainer.train)


def console_main() -> None:
  """The `samtone-train` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
