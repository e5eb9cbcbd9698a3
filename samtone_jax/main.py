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

from collections.abc import Callable, Iterator, Sequence
import difflib
import faulthandler
import functools
import importlib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import gin

from samtone_jax import compilation_cache
from samtone_jax import distributed
from samtone_jax import errors

EXIT_WATCHDOG_SECONDS = 60

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


class _QuietGinResourceReader(std_logging.Filter):
  """gin first looks each file up as a package resource and logs 'Path not found' at ERROR
  before finding it on the search path; those lines are noise, not errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


std_logging.getLogger().addFilter(_QuietGinResourceReader())


def _macro_references(value) -> Iterator[str]:
  """Names of the macros `%NAME` referenced anywhere inside a bound value (lists, dicts...)."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.configurable.name == "macro":
      yield value.scoped_selector.split("/")[0]
  elif isinstance(value, dict):
    for item in value.values():
      yield from _macro_references(item)
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      yield from _macro_references(item)


def _macros() -> tuple[set[str], set[str]]:
  """(macros bound, macros referenced) in the current gin config."""
  bound, referenced = set(), set()
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro":
      bound.add(scope)
    for value in params.values():
      referenced.update(_macro_references(value))
  return bound, referenced


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (later wins), searching `search_paths` and GIN_DIR.

  gin checks parameter names, but a macro is just a name: `--gin.TRAIN_STEP=1` would silently
  define a new macro that nothing reads. So a macro bound by `gin_bindings` that no file defines
  and nothing references is refused, naming the closest known macro.

  Raises:
    errors.ConfigError: a file is missing, a binding does not parse or names an unknown
      configurable, parameter or macro.
  """
  for path in list(search_paths) + [GIN_DIR, _PACKAGE_DIR]:
    if path:
      gin.add_config_file_search_path(os.path.abspath(path))
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
    from_files, _ = _macros()
    gin.parse_config_files_and_bindings(None, list(gin_bindings), finalize_config=False)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # gin raises ValueError / IOError / KeyError etc. with the file and line in the message.
    raise errors.ConfigError(f"Error in the gin configuration: {type(e).__name__}: {e}") from e
  bound, referenced = _macros()
  known = from_files | referenced
  for name in sorted(bound - known):
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = (f"did you mean {close[0]}?" if close else
            f"known macros: {', '.join(sorted(known))}")
    raise errors.ConfigError(
        f"Error in the gin configuration: macro {name} is bound on the command line but no gin "
        f"file defines or uses it; {hint}")


def gin_macro(name: str, default=None):
  """The value of gin macro `name` (e.g. "MODEL_DIR"), or `default` when it is not bound."""
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return default


def write_config(model_dir: str) -> str:
  """Writes the current gin config to MODEL_DIR/config.gin (process 0); returns the path."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  return trainer.write_config(model_dir, gin.config_str())


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
  parse_gin(GIN_FILES.value, GIN_BINDINGS.value, GIN_SEARCH_PATHS.value)
  configure_data_from_gin()


def configure_data_from_gin() -> None:
  """Calls `paths.configure_data_dirs` with its gin bindings, if it has any.

  Data locations and per-dataset vocabularies must be known before the tasks are registered
  (the commands import `samtone_jax.tasks.all` later), so the boundary applies them here.
  """
  from samtone_jax.tasks import paths  # pylint: disable=g-import-not-at-top
  try:
    bindings = gin.get_bindings(paths.configure_data_dirs)
  except ValueError:  # no gin file imports samtone_jax.tasks.paths
    bindings = {}
  if bindings:
    gin.get_configurable(paths.configure_data_dirs)()


def call_configured(fn: Callable[..., object], **kwargs) -> object:
  """Calls `fn` with its gin bindings (and `kwargs`, which gin does not bind).

  Raises:
    errors.ConfigError: `fn` is not configurable (no gin file imports its module).
  """
  try:
    configured = gin.get_configurable(fn)
  except ValueError as e:
    raise errors.ConfigError(f"Error in the gin configuration: {e}") from e
  return configured(**kwargs)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  setup_from_flags()
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  # The trainer writes MODEL_DIR/config.gin once it holds the run directory's lock and has
  # checked the configuration and the data, so that a refused run leaves nothing behind.
  call_configured(trainer.train, config_text=gin.config_str())


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
  call_configured(getattr(module, function_name))


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
