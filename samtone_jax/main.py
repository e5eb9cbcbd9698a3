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
                      --gin.train_step.LossConfig.same_tower_negatives=False.
  --gin_search_paths  comma-separated directories for gin files and includes; the repository's
                      gin/ directory is always searched.
  --tfds_data_dir     where TFDS datasets live (overrides seqio's default).
  plus samtone_jax.distributed's multi-host flags (--multiprocess_gpu, --coordinator_address,
  --process_count, --process_index).

The gin files bind `trainer.train` (see gin/runs/*.gin); the full config is written to
MODEL_DIR/config.gin before training starts. A wrong binding or a missing file exits with status 1
and gin's message on stderr; a non-finite loss exits with status 1 and the step.
"""

from collections.abc import Callable, Sequence
import importlib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import gin

from samtone_jax import distributed

# The gin files, inside the package so that a wheel ships them: in the checkout `samtone_jax/gin` is
# a symlink to the top-level `gin/` (the one copy in git, where T5X users look for it), which
# setuptools follows into the wheel.
GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin")
# Searched after GIN_DIR so that the checkout's spelling `gin/experiments/X.gin` (and the t5x gin
# files' `include 'gin/...'`) resolves from any directory too.
_PACKAGE_DIR = os.path.dirname(GIN_DIR)

GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file(s), parsed in order; relative to --gin_search_paths.")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Individual gin bindings (also given as --gin.NAME=VALUE).")
GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths", [GIN_DIR],
    "Comma-separated directories searched for gin files and includes (the package's gin/ "
    "directory, the repository's top-level gin/, is always added).")
TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir", None, "TFDS data directory; overrides seqio's default when set.")


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


class _QuietGinResourceReader(std_logging.Filter):
  """gin first looks each file up as a package resource and logs 'Path not found' at ERROR
  before finding it on the search path; those lines are noise, not errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


std_logging.getLogger().addFilter(_QuietGinResourceReader())


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (later wins), searching `search_paths` and GIN_DIR."""
  for path in list(search_paths) + [GIN_DIR, _PACKAGE_DIR]:
    if path:
      gin.add_config_file_search_path(os.path.abspath(path))
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=False)


def gin_macro(name: str, default=None):
  """The value of gin macro `name` (e.g. "MODEL_DIR"), or `default` when it is not bound."""
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return default


def write_config(model_dir: str) -> str:
  """Writes the current gin config to MODEL_DIR/config.gin (process 0); returns the path."""
  import jax  # pylint: disable=g-import-not-at-top
  from samtone_jax import io_utils  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "config.gin")
  if jax.process_index() == 0:
    io_utils.makedirs(model_dir)  # MODEL_DIR may be gs:// on a pod.
    with io_utils.open_file(path, "w") as f:
      f.write(gin.config_str())
  return path


def setup_from_flags() -> None:
  """Multi-host start-up, TFDS directory and gin parsing from the parsed absl flags.

  Exits with status 1 and gin's message when a gin file or binding is wrong.
  """
  if not flags.FLAGS["verbosity"].present:
    # orbax and seqio log every save and read at INFO; progress is printed by the trainer.
    logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  if TFDS_DATA_DIR.value:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(TFDS_DATA_DIR.value)
  try:
    parse_gin(GIN_FILES.value, GIN_BINDINGS.value, GIN_SEARCH_PATHS.value)
  except Exception as e:  # pylint: disable=broad-except
    # gin raises ValueError / IOError / KeyError etc. with the file and line in the message.
    print(f"Error in the gin configuration: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)


def call_configured(fn: Callable[..., object]) -> object:
  """Calls `fn` with its gin bindings; a binding gin rejects at call time exits with status 1."""
  try:
    configured = gin.get_configurable(fn)
  except ValueError as e:
    print(f"Error in the gin configuration: {e}", file=sys.stderr)
    sys.exit(1)
  return configured()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  setup_from_flags()
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  model_dir = gin_macro("MODEL_DIR")
  if isinstance(model_dir, str):
    write_config(model_dir)
  try:
    call_configured(trainer.train)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"Training stopped: {e}", file=sys.stderr)
    sys.exit(1)


def run_configured_entry_point(run_gin: str, module_name: str, function_name: str) -> None:
  """`python -m samtone_jax.evaluate` / `.encode`: parse `run_gin` first, then call the function.

  `run_gin` goes first so that the experiment's files and --gin bindings override its defaults. The
  function is looked up by module name: under `python -m` the entry module is `__main__`, but gin
  registered it under its package name.
  """
  GIN_FILES.value.insert(0, run_gin)
  setup_from_flags()
  module = importlib.import_module(module_name)
  from samtone_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    call_configured(getattr(module, function_name))
  except (FileNotFoundError, checkpoints.UnsupportedCheckpointError) as e:
    # A missing or unreadable checkpoint / file: the message says which and what to do.
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)


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


def run(main_fn: Callable[[Sequence[str]], None]) -> None:
  """`app.run` with `--gin.NAME=VALUE` rewritten first; --help prints the entry's real usage.

  The usage is the docstring of `main_fn`'s module (the entry module) and our flags.
  """
  if any(arg in HELP_ARGS for arg in sys.argv[1:]):
    print(usage(sys.modules[main_fn.__module__].__doc__ or ""), end="")
    sys.exit(0)
  app.run(main_fn, flags_parser=lambda args: app.parse_flags_with_usage(rewrite_gin_args(args)))


def console_main() -> None:
  """The `samtone-train` console script."""
  run(main)


if __name__ == "__main__":
  console_main()
