"""An export is written into a fresh directory beside its target, then renamed into place.

A failed export leaves nothing at the target; an existing non-empty target is refused unless
overwrite is set, and is then replaced only once the new export is complete.
"""

from collections.abc import Iterator
import contextlib
import os
import pathlib
import shutil
import tempfile

from samtone_jax import errors


class ExportError(errors.UserError, ValueError):
  """The export cannot be written as asked (the message says what to do)."""


def local_export_dir(export_dir: str) -> pathlib.Path:
  """`export_dir` as a local path; remote URLs are refused (exporters write local files)."""
  if "://" in export_dir and not export_dir.startswith("file://"):
    raise ExportError(f"EXPORT_DIR={export_dir!r}: exports are written to local disk; export to a "
                      f"local directory, then copy it (e.g. `gsutil -m cp -r DIR {export_dir}`).")
  return pathlib.Path(export_dir.removeprefix("file://")).absolute()


def check_export_dir(export_dir: str, overwrite: bool) -> pathlib.Path:
  """Fails before any work when the export could not be written.

  Raises:
    ExportError: `export_dir` is a file, or a non-empty directory and `overwrite` is False.
  """
  target = local_export_dir(export_dir)
  if target.exists() and not target.is_dir():
    raise ExportError(f"EXPORT_DIR={str(target)!r} is a file, not a directory.")
  if target.is_dir() and any(target.iterdir()) and not overwrite:
    raise ExportError(f"EXPORT_DIR={str(target)!r} is not empty; choose another directory or "
                      "replace it with --gin.EXPORT_OVERWRITE=True.")
  return target


@contextlib.contextmanager
def staged_directory(export_dir: str, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields an empty directory beside `export_dir`; on success it becomes `export_dir`.

  On an exception the staging directory is removed and `export_dir` is untouched.
  """
  target = check_export_dir(export_dir, overwrite)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if target.is_dir() and any(target.iterdir()):
    # Overwrite: move the old export aside first, so that the target is never half-written.
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "export")
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
  else:
    if target.is_dir():
      target.rmdir()
    os.rename(staging, target)
