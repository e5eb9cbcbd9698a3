"""The shared command-line shell of every samtone_jax command (a library, not an entry module).

The flags in t5x's spelling (--gin_file, --gin.NAME=VALUE, --gin_search_paths, --tfds_data_dir,
--compilation_cache_dir, --verbose; the multi-host flags live in `distributed`), the set-up they
drive (`setup_from_flags`), `run` (absl's app.run with --gin. rewriting, --help printing the
entry's real usage, and user errors reported as one message with exit status 1) and
`run_configured_entry_point` for commands whose run file binds one function. The entry modules
(main, evaluate, encode, mine, export, probe, predict, cache_tasks, the demos) are thin shells over
it and never import each other.
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


def setup_demo_from_flags(binding_flag: str | None = "--binding") -> None:
  """`setup_from_flags` for the demos, which parse their own experiments for every run.

  A demo trains several runs in one process through `gin_config.run_from_gin`, which starts each
  from a cleared gin config, so --gin_file and --gin.NAME=VALUE would be dropped silently: they
  are refused. Everything else is every command's set-up: multi-host start-up, the persistent
  compilation cache (a demo's second seed or stage reads the first's programs from it, and a
  second `make demo` compiles nothing), --tfds_data_dir and the log verbosity.

  Args:
    binding_flag: the demo's own flag for extra gin bindings, named in the error; None: it has
      none.

  Raises:
    errors.ConfigError: --gin_file or --gin bindings were given (`run` reports it, exit 1).
  """
  if GIN_FILES.value or GIN_BINDINGS.value:
    given = [*(f"--gin_file={f}" for f in GIN_FILES.value),
             *(f"--gin.{b.replace(' = ', '=', 1)}" for b in GIN_BINDINGS.value)]
    hint = (f"pass gin bindings with {binding_flag}='NAME = VALUE' (applied to every run)"
            if binding_flag else "it takes no gin flags")
    raise errors.ConfigError(
        f"The demo trains its own experiments; {hint}, not {' '.join(given)}.")
  setup_from_flags()


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


# The gin flags a demo refuses (`setup_demo_from_flags`): its --help does not offer them.
DEMO_HIDDEN_FLAGS = ("gin_file", "gin_bindings")


def _without_flags(section: str, hidden: Sequence[str]) -> str:
  """absl's help text of one module without the entries of the `hidden` flags.

  An entry is its "  --name: ..." (or "  --[no]name: ...") line and the deeper-indented lines
  under it.
  """
  kept, skipping = [], False
  for line in section.splitlines():
    if line.startswith("  --"):
      name = line[4:].split(":", 1)[0].removeprefix("[no]")
      skipping = name in hidden
    elif not line.startswith("    "):
      skipping = False
    if not skipping:
      kept.append(line)
  return "\n".join(kept)


def usage(doc: str, hidden_flags: Sequence[str] = ()) -> str:
  """`doc` (the entry module's docstring) and the help of every samtone_jax flag.

  absl's own --help prints the docstring and flags of `__main__`; under a console script that is
  the generated wrapper, which has neither, so the usage would be only "Try --helpfull".
  `hidden_flags` are left out (flags the command refuses).
  """
  by_module = flags.FLAGS.flags_by_module_dict()
  # Flags of a module run with `python -m` are registered under sys.argv[0].
  ours = sorted(m for m in by_module if m.startswith("samtone_jax") or m == sys.argv[0])
  sections = [_without_flags(flags.FLAGS.module_help(m).strip(), hidden_flags) for m in ours]
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


def run(main_fn: Callable[[Sequence[str]], None], hidden_flags: Sequence[str] = ()) -> None:
  """`app.run` with `--gin.NAME=VALUE` rewritten first, user errors reported as one message, and
  --help printing the entry's real usage (the docstring of `main_fn`'s module and our flags,
  without `hidden_flags`: the demos pass `DEMO_HIDDEN_FLAGS`, the gin flags they refuse)."""
  if any(arg in HELP_ARGS for arg in sys.argv[1:]):
    print(usage(sys.modules[main_fn.__module__].__doc__ or "", hidden_flags), end="")
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
