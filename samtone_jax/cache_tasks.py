r"""Entry point writing seqio task caches (TFRecord shards) that training reads host by host.

  samtone-cache-tasks --tasks=msmarco_passage_train --output_cache_dir=/data/seqio_cache \
    --num_shards=64

writes /data/seqio_cache/msmarco_passage_train/ in seqio's cached-task layout ({split}.tfrecord-
NNNNN-of-NNNNN, info.{split}.json, stats.{split}.json, COMPLETED); train from it with
--gin.USE_CACHED_TASKS=True --gin.TASK_CACHE_DIRS=\"['/data/seqio_cache']\". Shard k holds a
contiguous range of the source, in order (the cached task yields the uncached task's examples).
Use at least as many shards as training hosts, ideally a multiple, so each host reads whole files.

One local process (plain TF: Apache Beam needs protobuf < 7, which this environment's sentencepiece
refuses; see README "Cached tasks"); for full MS MARCO on Dataflow use seqio's own
`seqio.scripts.cache_tasks_main` in its own environment (README), whose caches training reads too.
--verify reads every record of an existing cache and checks it against its task (CRCs, shard
sizes, task name and vocabulary) instead of writing. Data locations: as for training
(SAMTONE_MSMARCO_DIR, ... or --gin_file/--gin. bindings of samtone_jax.tasks.paths); the tasks
are registered by importing --module_import. A bad cache or bad raw data is one error message
naming the file, exit status 1, and no COMPLETED cache is left behind.
"""

from collections.abc import Sequence
import importlib

from absl import app
from absl import flags

from samtone_jax import cli

TASKS = flags.DEFINE_list("tasks", None, "Registered seqio task names to cache (comma-separated).")
OUTPUT_CACHE_DIR = flags.DEFINE_string(
    "output_cache_dir", None, "Global cache directory (local or gs://); each task goes to "
    "<output_cache_dir>/<task name>/.")
SPLITS = flags.DEFINE_list("splits", ["train"], "Splits to cache.")
NUM_SHARDS = flags.DEFINE_integer("num_shards", 16, "TFRecord files per split (>= hosts).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing cache of a task.")
VERIFY = flags.DEFINE_bool("verify", False, "Check existing caches (every record) instead of "
                           "writing.")
MODULE_IMPORT = flags.DEFINE_multi_string(
    "module_import", ["samtone_jax.tasks.all"], "Modules whose import registers the tasks.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not TASKS.value or not OUTPUT_CACHE_DIR.value:
    raise app.UsageError("--tasks and --output_cache_dir are required.")
  cli.setup_from_flags()
  for module in MODULE_IMPORT.value:
    importlib.import_module(module)
  from samtone_jax.tasks import cache  # pylint: disable=g-import-not-at-top
  for name in TASKS.value:
    for split in SPLITS.value:
      if VERIFY.value:
        count = cache.verify_cache(name, OUTPUT_CACHE_DIR.value, split)
        print(f"{name} ({split}): {count} records intact", flush=True)
      else:
        task_dir = cache.cache_task(name, OUTPUT_CACHE_DIR.value, split=split,
                                    num_shards=NUM_SHARDS.value, overwrite=OVERWRITE.value)
        print(f"Wrote {name} ({split}) to {task_dir}", flush=True)


def console_main() -> None:
  """The `samtone-cache-tasks` console script."""
  cli.run(main)


if __name__ == "__main__":
  console_main()
