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

from collections.abc import Callable, Sequence
import faulthandler
import functools
import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging

from samtone_jax import compilation_cache
from samtone_jax import distributed
from samtone_jax import errors
from samtone_jax import gin_config

EXIT_WATCHDOG_SECONDS = 60

GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file(s), parsed in order; relative to --gin_search_paths.")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Individual gin bindings (also given as --gin.NAME=VALUE).")
GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths", [gin_config.GIN_DIR],
    "Comma-separated directories searched for gin files and includes (the package's gin/ "
    "directory, the repository's top-level gin/, is always added).")
TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir", None, "TFDS data directory; overrides seqio's default when set.")
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache directory; on by default for CPU/GPU runs in "
    "$SAMTONE_COMPILATION_CACHE_DIR or ~/.cache/samtone_jax/jax_cache; '' or 'off' turns it off "
    "(JAX_COMPILATION_CACHE_DIR, when set, wins).")
VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the full traceback of configuration, data and checkpoint errors "
    "(also SAMTONE_DEBUG=1); without it they are one message.")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """Rewrites t5x's `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`.

  Raises:
    app.UsageError: a `--gin.` flag without `=`.
  """
  rewritten = []
  for arg in args:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise app.UsageError(f"Gin bindings must look like --gin.NAME=VALUE; got {arg!r}")
      name, value = arg[len("--gin."):].split("=", 1)
      arg = f"--gin_bindings={name} = {value}"
    rewritten.append(arg)
  return rewritten


def setup_from_flags() -> None:
  """Multi-host start-up, TFDS directory, gin parsing and data locations from the parsed flags.

  Raises:
    errors.ConfigError: a gin file or binding is wrong (`run` reports it and exits with 1).
  """
  if not flags.FLAGS["verbosity"].present:
    # orbax and seqio log every save and read at INFO; progress is printed by the trainer.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  compilation_cache.configure(COMPILATION_CACHE_DIR.value)
  if TFDS_DATA_DIR.value:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(TFDS_DATA_DIR.value)
  gin_config.parse_gin(GIN_FILES.value, GIN_BINDINGS.value, GIN_SEARCH_PATHS.value)
  gin_config.configure_data_from_gin()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  setup_from_flags()
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  # The trainer writes MODEL_DIR/config.gin once it holds the run directory's lock and has
  # checked the configuration and the data, so that a refused run leaves nothing behind.
  gin_config.call_configured(trainer.train)


def run_configured_entry_point(run_gin: str, module_name: str, function_name: str) -> None:
  """`python -m samtone_jax.evaluate` / `.encode`: parse `run_gin` first, then call the function.

  `run_gin` goes first so that the experiment's files and --gin bindings override its defaults. The
  function is looked up by module name: under `python -m` the entry module is `__main__`, but gin
  registered it under its package name.
  """
  GIN_FILES.value.insert(0, run_gin)
  setup_from_flags()
  module = importlib.import_module(module_name)
  # A missing or unreadable checkpoint is an errors.UserError: `run` reports it as one message.
  gin_config.call_configured(getattr(module, function_name))


HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def usage(doc: str) -> str:
  """`doc` (the entry module's docstring) and the help of every samtone_jax flag.

  absl's own --help prints the docstring and flags of `__main__`; under a console script that is
  the generated wrapper, which has neither, so the usage would be only "Try --helpfull".
  """
  by_module = flags.FLAGS.flags_by_module_dict()
  # Flags of a module run with `python -m` are registered under sys.argv[0].
  ours = sorted(m for m in by_module if m.startswith("samtone_jax") or m == sys.argv[0])
  sections = [flags.FLAGS.module_help(m).strip() for m in ours]
  return (doc.strip() + "\n\nflags:\n\n" + "\n\n".join(s for s in sections if s) +
          "\n\n(--helpfull also lists absl's and JAX's own flags.)\n")


def show_tracebacks() -> bool:
  """Whether user errors show their traceback: --verbose or SAMTONE_DEBUG set (not "0")."""
  if os.environ.get("SAMTONE_DEBUG", "0") not in ("", "0"):
    return True
  return flags.FLAGS.is_parsed() and VERBOSE.value


def user_error_message(error: BaseException) -> str:
  """The message of a user error without gin's "In call to configurable ..." trailer."""
  lines = str(error).splitlines()
  return "\n".join(line for line in lines if not line.strip().startswith("In call to configurable"))


def report_user_errors(main_fn: Callable[[Sequence[str]], None]
                       ) -> Callable[[Sequence[str]], None]:
  """Wraps an entry point's main: a `UserError` becomes one message on stderr and exit status 1.

  Every command goes through this (via `run`), so user errors are reported one way. With
  --verbose / SAMTONE_DEBUG=1 the error propagates with its traceback (status 1 as well).
  """

  @functools.wraps(main_fn)
  def wrapped(argv: Sequence[str]) -> None:
    try:
      main_fn(argv)
    except errors.UserError as e:
      if show_tracebacks():
        raise
      message = user_error_message(e)
      if not message.startswith("Error"):
        message = f"Error: {message}"
      print(message, file=sys.stderr, flush=True)
      # Last resort, never expected to fire: the input pipelines are shut down before the error
      # gets here, but if a library thread still blocked interpreter exit, a C-level watchdog
      # (it needs no GIL) dumps the stacks and ends the process, so that a scheduler waiting for
      # the exit status is never left waiting.
      faulthandler.dump_traceback_later(EXIT_WATCHDOG_SECONDS, exit=True)
      sys.exit(1)

  return wrapped


def run(main_fn: Callable[[Sequence[str]], None]) -> None:
  """`app.run` with `--gin.NAME=VALUE` rewritten first, user errors reported as one message, and
  --help printing the entry's real usage (the docstring of `main_fn`'s module and our flags)."""
  if any(arg in HELP_ARGS for arg in sys.argv[1:]):
    print(usage(sys.modules[main_fn.__module__].__doc__ or ""), end="")
    sys.exit(0)
  app.run(report_user_errors(main_fn), flags_parser=_parse_flags)


def _parse_flags(args: Sequence[str]) -> list[str]:
  """absl's flag parsing after `rewrite_gin_args`; a malformed --gin. flag is one message."""
  try:
    rewritten = rewrite_gin_args(args)
  except app.UsageError as e:
    print(f"Error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  return app.parse_flags_with_usage(rewritten)


def console_main() -> None:
  """The `samtone-train` console script."""
  run(main)


if __name__ == "__main__":
  console_main()
