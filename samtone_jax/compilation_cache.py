"""The persistent XLA compilation cache of the commands: a resumed or evaluated run skips compiling.

Every command (`samtone_jax.main`, `evaluate`, `encode`, ...) turns JAX's persistent compilation
cache on for CPU and GPU runs, in this order of precedence:

  1. JAX_COMPILATION_CACHE_DIR (JAX's own variable), when set, is left to JAX;
  2. the `--compilation_cache_dir` flag;
  3. the SAMTONE_COMPILATION_CACHE_DIR environment variable;
  4. `DEFAULT_DIR`, ~/.cache/samtone_jax/jax_cache.

An empty value or "off" (flag or variable) turns the cache off. TPU runs keep it off unless a
directory is given explicitly (a pod's hosts would each fill their own home directory; give them
a shared gs:// directory instead). Programs that compile in under JAX's threshold
(jax_persistent_cache_min_compile_time_secs, 1 s) are not written.
"""

import os

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "samtone_jax", "jax_cache")
ENV_VAR = "SAMTONE_COMPILATION_CACHE_DIR"
_OFF = ("", "off", "none", "false", "0")


def resolve_dir(flag_value: str | None, environ=os.environ) -> tuple[str | None, bool]:
  """The cache directory the command should use, and whether it was asked for explicitly.

  Args:
    flag_value: `--compilation_cache_dir` (None: not given).
    environ: the environment (SAMTONE_COMPILATION_CACHE_DIR).

  Returns:
    (directory or None for off, explicit): `explicit` is False for the built-in default.
  """
  for value in (flag_value, environ.get(ENV_VAR)):
    if value is not None:
      return (None if value.strip().lower() in _OFF else os.path.expanduser(value)), True
  return os.path.expanduser(DEFAULT_DIR), False


def configure(flag_value: str | None = None, environ=os.environ) -> str | None:
  """Turns the persistent compilation cache on as `resolve_dir` says; returns the directory.

  Call after `jax.distributed` is initialised (it asks for the backend) and before compiling.
  Returns None when the cache stays off, or JAX's own setting when JAX_COMPILATION_CACHE_DIR
  (jax_compilation_cache_dir) is already set.
  """
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory, explicit = resolve_dir(flag_value, environ)
  if directory is None or (not explicit and jax.default_backend() == "tpu"):
    return None
  if "://" not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
