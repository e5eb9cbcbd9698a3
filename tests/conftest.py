"""Test setup: 8 fake CPU devices, set before anything imports JAX."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# TensorFlow (used by seqio/TFDS) must never grab a GPU or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The commands' persistent compilation cache (on by default, in ~/.cache) goes to one temporary
# directory per test session, shared by its subprocesses and removed at the end, never the user's.
if "SAMTONE_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _cache_dir = tempfile.mkdtemp(prefix="samtone_test_jax_cache_")
  os.environ["SAMTONE_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def fast_compile():
  """Turns off most XLA optimisations for a module of tiny programs, where compile time dominates.

  The math is unchanged; opt in with `pytestmark = pytest.mark.usefixtures("fast_compile")`.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after the environment above is set)
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
