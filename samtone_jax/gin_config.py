"""Gin at the boundary: parse the project's gin files, then call a library function with them.

The one owner of "gin files + bindings -> a call": every command (`samtone_jax.main` and the
other entry modules, through `cli.setup_from_flags`), the demos, `launch/aot_compile.py`,
benchmarks and tests use it; library code never reads gin.

  run_from_gin(files, bindings)            parse from a clean config, call `trainer.train`
  run_from_gin(files, bindings, fn=f)      ... or any configured function `f`
  configured_arguments(fn)                 the arguments the parsed config gives `fn`
  parse_gin, gin_macro, call_configured    the pieces, for commands that parse flags first

Gin files are found in the current directory, then in the search paths, then in the package's own
`gin/` (GIN_DIR), so `experiments/X.gin` and `gin/experiments/X.gin` both work from anywhere.
"""

from collections.abc import Callable, Collection, Iterator, Sequence
import difflib
import inspect
import logging as std_logging
import os
import re
from typing import Any
import warnings

import gin

from samtone_jax import errors

# The gin files, inside the package so that a wheel ships them: in the checkout `samtone_jax/gin` is
# a symlink to the top-level `gin/` (the one copy in git, where T5X users look for it), which
# setuptools follows into the wheel.
GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin")
# Searched after GIN_DIR so that the checkout's spelling `gin/experiments/X.gin` (and the t5x gin
# files' `include 'gin/...'`) resolves from any directory too.
_PACKAGE_DIR = os.path.dirname(GIN_DIR)


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


# Configurables renamed in this release: {old selector: new}. Gin files reach an old name through
# its module's deprecated attribute (e.g. `train_step.__getattr__`); a --gin. binding is looked up
# by name, so `parse_gin` rewrites it (with a FutureWarning). Remove after the next release.
DEPRECATED_SELECTORS = {"train_step.LossConfig": "losses.LossConfig"}


def _renamed_binding(binding: str) -> str:
  """`binding` with every deprecated selector replaced by its new name (warning once each)."""
  for old, new in DEPRECATED_SELECTORS.items():
    renamed = re.sub(rf"(?<![\w.]){re.escape(old)}\b", new, binding)
    if renamed != binding:
      warnings.warn(f"{old} is deprecated and will be removed after the next release: spell it "
                    f"{new} (--gin.{new}.X=Y).", FutureWarning, stacklevel=3)
      binding = renamed
  return binding


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (later wins), searching `search_paths` and GIN_DIR.

  gin checks parameter names, but a macro is just a name: `--gin.TRAIN_STEP=1` would silently
  define a new macro that nothing reads. So a macro bound by `gin_bindings` that no file defines
  and nothing references is refused, naming the closest known macro. Deprecated selectors in
  `gin_bindings` (DEPRECATED_SELECTORS) are rewritten to their new names.

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
    gin.parse_config_files_and_bindings(None, [_renamed_binding(b) for b in gin_bindings],
                                        finalize_config=False)
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
  _check_model_kind_bindings()


def _check_model_kind_bindings() -> None:
  """Refuses dual-encoder architecture bindings that an encoder-decoder run would ignore
  (`model_kinds.check_architecture_bindings`; the config that binds them is never built)."""
  try:
    model = gin.query_parameter("trainer.train.model")
  except ValueError:  # no run file binds trainer.train (evaluate, encode, ...)
    return
  configurable = getattr(model, "configurable", None)
  if getattr(configurable, "name", None) != "EncoderDecoderModel":
    return
  bound = {}
  from samtone_jax import model_kinds  # pylint: disable=g-import-not-at-top
  for field in model_kinds.DUAL_ENCODER_ARCHITECTURE_FIELDS:
    try:
      bound[field] = gin.query_parameter(f"config.DualEncoderConfig.{field}")
    except ValueError:  # not bound (or no file imports samtone_jax.models.config)
      pass
  try:
    model_kinds.check_architecture_bindings(bound)
  except ValueError as e:
    raise errors.ConfigError(f"Error in the gin configuration: {e}") from None


def gin_macro(name: str, default=None):
  """The value of gin macro `name` (e.g. "MODEL_DIR"), or `default` when it is not bound."""
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return default



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
  check_required_macros(fn, given=kwargs)
  return configured(**kwargs)


def _unset_macro(value: Any) -> str | None:
  """The macro `value` names (`%X`, or a chain `%X` -> `%Y` -> ...), if its value is still
  `%gin.REQUIRED`; else None. Nothing is evaluated (an `@f()` reference would call `f`)."""
  name, seen = None, set()
  while isinstance(value, gin.config.ConfigurableReference):
    text = str(value)  # gin's config syntax: "%NAME" for a macro, "@f()" for a configurable
    if text == "%gin.REQUIRED":
      return name
    if not text.startswith("%") or text in seen:
      return None
    seen.add(text)
    name = text[1:]
    try:
      value = gin.query_parameter(text)
    except ValueError:  # not a macro (a gin constant) or never defined: gin reports the latter
      return None
  return None


def check_required_macros(fn: Callable[..., Any], given: Collection[str] = ()) -> None:
  """Refuses to call `fn` with an argument bound to a macro that is still `%gin.REQUIRED`.

  A run file declares the macros it needs (`CHECKPOINT_PATH = %gin.REQUIRED`); gin hands such an
  unset macro to the function as its REQUIRED sentinel object, which would fail later with an
  unrelated TypeError. Only `fn`'s own arguments are checked, from the unevaluated bindings;
  arguments in `given` (passed by the caller) are not.

  Raises:
    errors.ConfigError: naming each unset macro and the argument it feeds.
  """
  try:
    bindings = gin.get_bindings(fn, resolve_references=False)
  except ValueError:  # no gin file imports fn's module
    return
  missing = [(name, macro) for name, value in bindings.items()
             if name not in given and (macro := _unset_macro(value)) is not None]
  if missing:
    where = ", ".join(f"{macro} (for {fn.__module__.split('.')[-1]}.{fn.__name__}.{name})"
                      for name, macro in missing)
    example = missing[0][1]
    raise errors.ConfigError(
        f"Error in the gin configuration: required macro{'s' if len(missing) > 1 else ''} "
        f"{where} {'are' if len(missing) > 1 else 'is'} not set: bind it, e.g. "
        f"--gin.{example}=..., or pass the experiment's --gin_file that defines it.")


def configured_arguments(fn: Callable[..., Any], required: Sequence[str] = ()) -> dict[str, Any]:
  """The arguments the parsed gin config gives `fn`, its defaults filled in, without calling it.

  Args:
    fn: a function the gin files bind (e.g. `trainer.train`).
    required: argument names that must be bound.

  Raises:
    errors.ConfigError: a `required` argument is not bound.
  """
  try:
    bindings = gin.get_bindings(fn)
  except ValueError:  # no gin file imports fn's module
    bindings = {}
  bound = inspect.signature(fn).bind_partial(**bindings)
  bound.apply_defaults()
  missing = [name for name in required if name not in bound.arguments]
  if missing:
    raise errors.ConfigError(
        f"The gin config does not bind {fn.__module__.split('.')[-1]}.{fn.__name__}'s "
        f"{', '.join(missing)}; pass an experiment's --gin_file (or its model, architecture, "
        "loss and run files).")
  return bound.arguments


def run_from_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                 fn: Callable[..., Any] | None = None, *, search_paths: Sequence[str] = (),
                 keep_config: bool = False, **kwargs) -> Any:
  """Parses `gin_files` then `gin_bindings` into a clean gin config and calls `fn` with them.

  What `python -m samtone_jax.main --gin_file=F --gin.B` does after its flags, for a notebook, a
  demo or a test: the config is cleared first (nothing leaks from an earlier run), data locations
  bound in gin are applied (`configure_data_from_gin`), and `fn` is called with its bindings and
  `kwargs`. `trainer.train` writes the operative config to MODEL_DIR/config.gin itself.

  Args:
    gin_files: parsed in order, e.g. ["experiments/demo_samtone.gin"].
    gin_bindings: gin statements applied after the files, e.g. ['MODEL_DIR = "/tmp/run"'].
    fn: the function to call; default `trainer.train`.
    search_paths: extra directories for gin files and includes.
    keep_config: leave the parsed config in place (to query other bindings afterwards; the
      caller clears it); default: cleared when `fn` returns or raises.
    **kwargs: arguments gin does not bind.

  Returns:
    What `fn` returns (a `trainer.TrainResult` for `trainer.train`).

  Raises:
    errors.ConfigError: a file, binding or macro is wrong (see `parse_gin`).
  """
  if fn is None:
    from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
    fn = trainer.train
  gin.clear_config()
  try:
    parse_gin(gin_files, gin_bindings, search_paths)
    configure_data_from_gin()
    return call_configured(fn, **kwargs)
  finally:
    if not keep_config:
      gin.clear_config()
