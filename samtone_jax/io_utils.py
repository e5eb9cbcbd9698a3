"""File access for run, output and embedding directories, local or on a remote file system.

On TPU pods MODEL_DIR, checkpoints and output directories are `gs://...` paths (storage every
worker sees). Python's `open`/`os.makedirs` cannot write those: `os.makedirs("gs://b/r")` silently
creates a local directory `gs:/b/r`. Every file the project writes or reads under such a directory
therefore goes through these functions, which use TensorFlow's `tf.io.gfile` (the file layer clu's
metric writers and the seqio readers already use; it also serves local paths and the in-memory
`ram://` file system the tests use). Paths are joined with `os.path.join`, which is correct for
URLs too ("gs://b/r" + "x" -> "gs://b/r/x").
"""

import io
import os
from typing import IO

import numpy as np
import tensorflow as tf


def is_local(path: str) -> bool:
  """True for a path of the local file system (no `scheme://`, or `file://`)."""
  return "://" not in path or path.startswith("file://")


def abspath(path: str) -> str:
  """`os.path.abspath` for a local path; a URL (gs://, ram://) unchanged."""
  return os.path.abspath(path) if is_local(path) else path


def open_file(path: str, mode: str = "r") -> IO:
  """Opens `path` ("r", "w", "a", "rb", "wb") on any file system tf.io.gfile supports."""
  return tf.io.gfile.GFile(path, mode)


def makedirs(path: str) -> None:
  """Creates `path` and its parents if missing (no error if it exists)."""
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def rename(source: str, destination: str) -> None:
  """Renames `source` to `destination`, replacing it if it exists (atomic on a local disk)."""
  tf.io.gfile.rename(source, destination, overwrite=True)


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def listdir(path: str) -> list[str]:
  """The entry names of directory `path` (without trailing slashes)."""
  return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def save_npy(path: str, array: np.ndarray) -> None:
  """Writes `array` as a `.npy` file at `path`."""
  with open_file(path, "wb") as f:
    np.save(f, array)


def load_npy(path: str) -> np.ndarray:
  """Reads a `.npy` file: memory-mapped (read-only) when local, else read whole into memory.

  A memmap needs a local file, so a remote shard (gs://) costs its full size in host memory while
  it is in use; copy large shards to local disk first when memory is short.
  """
  if is_local(path):
    return np.load(path.removeprefix("file://"), mmap_mode="r")
  with open_file(path, "rb") as f:
    return np.load(io.BytesIO(f.read()))
