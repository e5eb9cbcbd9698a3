"""Errors a user can cause and fix: one base class, so that every command reports them one way.

Every entry point runs through `samtone_jax.main.run`, which turns a `UserError` into one readable
line on stderr and exit status 1, without a traceback (unless `--verbose` or SAMTONE_DEBUG=1).
Anything else is a bug in samtone_jax or a library and keeps its full traceback.

A `UserError` message says where (file and line, gin binding, checkpoint step and file), what is
wrong, and what to do about it. Library code raises the most specific subclass; the data readers'
`DataFormatError` / `MissingDataError` (samtone_jax.tasks.readers) derive from it too.
"""


class UserError(Exception):
  """Bad input the user can fix: data, configuration, checkpoint or run directory."""


class ConfigError(UserError, ValueError):
  """A gin binding, flag or macro is wrong or inconsistent; the message names the binding."""


class CheckpointError(UserError):
  """A checkpoint is damaged or does not fit the configured model; names the step and file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint where the configuration points."""


class RunDirectoryLockedError(UserError):
  """Another live trainer holds MODEL_DIR; the message names its host, pid and start time."""


class EmbeddingShardError(UserError, ValueError):
  """An embeddings directory is incomplete or damaged; the message names the file."""
