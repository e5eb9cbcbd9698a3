"""One trainer per run directory: a lock file in MODEL_DIR, on local disks and on gs://.

Two trainers writing one MODEL_DIR corrupt each other's checkpoints (orbax's temporary directories
collide at the first save). `hold(model_dir)` takes `MODEL_DIR/train.lock`, a small JSON file:

  {"host": ..., "pid": ..., "started": <unix time>, "heartbeat": <unix time>, "token": ...}

and refreshes `heartbeat` from a daemon thread every `HEARTBEAT_SECONDS` until the run ends, when
the file is deleted. A second trainer finds the file and refuses with `RunDirectoryLockedError`
naming the holder. A lock whose holder died without deleting it (kill -9, a lost VM) is stale and
is taken over with a warning when its heartbeat is older than `STALE_SECONDS`, or at once when the
holder ran on this host and its pid is gone.

Creation is atomic on a local disk (a hard link that fails if the lock exists). tf.io.gfile has no exclusive create for
object stores, so on gs:// the lock is written and read back after `SETTLE_SECONDS`: GCS objects
are replaced whole with read-after-write consistency, so of two trainers that wrote at the same
moment only the last writer reads its own token back, and the other refuses.

With several processes (a pod) only process 0 takes the lock: the hosts of one run share the
directory by design.
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import tensorflow as tf

from samtone_jax import errors
from samtone_jax import io_utils

LOCK_NAME = "train.lock"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0  # 6 missed heartbeats; a VM lost for good is replaced in minutes
SETTLE_SECONDS = 2.0

# Locks this process holds: lock path -> token (a nested `hold` of the same directory is free).
_HELD: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class LockInfo:
  """What a lock file says about its holder."""

  host: str
  pid: int
  started: float
  heartbeat: float
  token: str

  def describe(self) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
    return (f"host {self.host}, pid {self.pid}, started {started}, last heartbeat "
            f"{time.time() - self.heartbeat:.0f} s ago")


def lock_path(model_dir: str) -> str:
  return os.path.join(io_utils.abspath(model_dir), LOCK_NAME)


def read_lock(path: str) -> LockInfo | None:
  """The lock at `path`, or None if there is none; an unreadable file counts as stale (None)."""
  try:
    with io_utils.open_file(path, "r") as f:
      data = json.loads(f.read())
    return LockInfo(host=str(data["host"]), pid=int(data["pid"]), started=float(data["started"]),
                    heartbeat=float(data["heartbeat"]), token=str(data["token"]))
  except tf.errors.NotFoundError:
    return None
  except (ValueError, KeyError, TypeError):  # half-written by a killed process
    logging.warning("Unreadable lock file %s; treating it as stale.", path)
    return LockInfo(host="?", pid=-1, started=0.0, heartbeat=0.0, token="")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def stale_reason(info: LockInfo, *, now: float | None = None,
                 stale_seconds: float = STALE_SECONDS) -> str | None:
  """Why the lock `info` is stale (its holder is gone), or None while it looks alive."""
  now = time.time() if now is None else now
  if info.host == socket.gethostname() and info.pid > 0 and not _pid_alive(info.pid):
    return f"its process {info.pid} on this host is gone"
  if now - info.heartbeat > stale_seconds:
    return f"its heartbeat is {now - info.heartbeat:.0f} s old (> {stale_seconds:.0f} s)"
  return None


def _serialise(info: LockInfo) -> str:
  return json.dumps(dataclasses.asdict(info))


def _create_exclusive(path: str, text: str) -> bool:
  """Creates `path` holding `text` unless it exists; True if this call created it."""
  if io_utils.is_local(path):
    # Written aside, then hard-linked into place: the link fails if the lock exists, and a
    # reader never sees the lock empty or half-written.
    local = path.removeprefix("file://")
    temporary = f"{local}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w") as f:
      f.write(text)
    try:
      os.link(temporary, local)
    except FileExistsError:
      return False
    finally:
      os.remove(temporary)
    return True
  if io_utils.exists(path):
    return False
  with io_utils.open_file(path, "w") as f:
    f.write(text)
  return True


def _write(path: str, text: str) -> None:
  """Replaces the lock's content without a moment where it is missing or half-written."""
  temporary = f"{path}.{uuid.uuid4().hex}.tmp"
  with io_utils.open_file(temporary, "w") as f:
    f.write(text)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def acquire(model_dir: str, *, stale_seconds: float = STALE_SECONDS) -> LockInfo:
  """Takes MODEL_DIR's lock for this process; returns what was written.

  Raises:
    errors.RunDirectoryLockedError: another live trainer holds it.
  """
  path = lock_path(model_dir)
  io_utils.makedirs(os.path.dirname(path))
  now = time.time()
  info = LockInfo(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                  token=uuid.uuid4().hex)
  for _ in range(3):  # a stale lock removed by us may be re-taken by a third trainer
    if _create_exclusive(path, _serialise(info)):
      if not io_utils.is_local(path):
        time.sleep(SETTLE_SECONDS)
        current = read_lock(path)
        if current is None or current.token != info.token:
          holder = current.describe() if current else "unknown"
          raise errors.RunDirectoryLockedError(
              f"{model_dir} was locked at the same moment by another trainer ({holder}). "
              "Use another MODEL_DIR, or wait for that run to end.")
      _HELD[path] = info.token
      return info
    holder = read_lock(path)
    if holder is None:
      continue  # released between our attempt and the read
    reason = stale_reason(holder, stale_seconds=stale_seconds)
    if reason is None:
      raise errors.RunDirectoryLockedError(
          f"MODEL_DIR {model_dir} is in use by another trainer ({holder.describe()}; lock file "
          f"{path}). Two trainers in one directory would corrupt its checkpoints: use another "
          f"MODEL_DIR, or wait for that run to end. If it is really gone, delete {path} "
          f"(a lock is also taken over by itself once its heartbeat is {stale_seconds:.0f} s "
          "old).")
    logging.warning("Taking over the stale lock %s of %s: %s.", path, holder.describe(), reason)
    print(f"Warning: taking over the stale lock {path} ({holder.describe()}): {reason}.",
          flush=True)
    tf.io.gfile.remove(path)
  raise errors.RunDirectoryLockedError(f"Could not take the lock {path}: other trainers keep "
                                       "taking it.")


def release(model_dir: str) -> None:
  """Deletes MODEL_DIR's lock if this process holds it."""
  path = lock_path(model_dir)
  token = _HELD.pop(path, None)
  if token is None:
    return
  current = read_lock(path)
  if current is not None and current.token == token:
    tf.io.gfile.remove(path)


class _Heartbeat(threading.Thread):
  """Rewrites the lock's heartbeat every `period` seconds until stopped."""

  def __init__(self, path: str, info: LockInfo, period: float):
    super().__init__(name="samtone-lock-heartbeat", daemon=True)  # never keeps the process alive
    self._path, self._info, self._period = path, info, period
    self._stop_requested = threading.Event()

  def run(self):
    while not self._stop_requested.wait(self._period):
      current = read_lock(self._path)
      if current is None or current.token != self._info.token:
        logging.error("The lock %s was taken by another process (%s); this run no longer "
                      "holds its directory.", self._path, current and current.describe())
        return
      try:
        _write(self._path, _serialise(dataclasses.replace(self._info, heartbeat=time.time())))
      except tf.errors.OpError as e:  # a transient storage error: try again next period
        logging.warning("Could not refresh the lock %s: %s", self._path, e)

  def stop(self):
    self._stop_requested.set()
    self.join()


@contextlib.contextmanager
def hold(model_dir: str, *, enabled: bool = True, heartbeat_seconds: float = HEARTBEAT_SECONDS,
         stale_seconds: float = STALE_SECONDS) -> Iterator[None]:
  """Holds MODEL_DIR's lock for the duration of the block (re-entrant within a process).

  Args:
    model_dir: the run directory.
    enabled: False on processes other than 0 of a multi-host run (they share the directory).
    heartbeat_seconds: how often the heartbeat is refreshed.
    stale_seconds: a heartbeat older than this marks another holder's lock as stale.

  Raises:
    errors.RunDirectoryLockedError: another live trainer holds the directory.
  """
  path = lock_path(model_dir)
  if not enabled or path in _HELD:
    yield
    return
  info = acquire(model_dir, stale_seconds=stale_seconds)
  heartbeat = _Heartbeat(path, info, heartbeat_seconds)
  heartbeat.start()
  try:
    yield
  finally:
    heartbeat.stop()
    release(model_dir)
