"""Writing outputs (converted models, train checkpoints, CapFilt and predict files) onto a disk
that may be full or read-only: one clear error naming the path (and the bytes needed, where
known), and whatever was half written removed, so no later run mistakes it for a result.

    check_writable(path, needed)      # before writing: refuse a read-only place or too little space
    with writing(path, needed, cleanup):  # while writing: a full / read-only disk -> OutputError
      ...
    write_atomic(path, data)          # one file, whole or not at all

Orbax and tensorstore report a full disk as `ValueError('RESOURCE_EXHAUSTED: ... No space left
on device')`, Python as `OSError(ENOSPC)`; both are recognised.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_TEXT = ('No space left on device', 'Disk quota exceeded', 'RESOURCE_EXHAUSTED')
_DENIED_TEXT = ('Read-only file system', 'Permission denied', 'Operation not permitted')


class OutputError(OSError):
  """An output that cannot be written where it was asked for (says where and why)."""


def size_text(n: float) -> str:
  if n < 1024:
    return f'{n:.0f} bytes'
  units = ['KiB', 'MiB', 'GiB', 'TiB']
  n /= 1024
  while n >= 1024 and len(units) > 1:
    n /= 1024
    units.pop(0)
  return f'{n:.1f} {units[0]}'


def _existing(path: str) -> str:
  """`path` or its nearest existing parent."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _needs(needed: int) -> str:
  return f'; about {size_text(needed)} needed' if needed else ''


def check_writable(path: str, needed: int = 0) -> None:
  """Raises `OutputError` when `path` (to be created or replaced) cannot be written: its place is
  read-only, or holds less free space than `needed` bytes."""
  place = _existing(path)
  if not os.path.isdir(place):
    place = os.path.dirname(place)
  if not os.access(place, os.W_OK):
    raise OutputError(f'{path}: cannot write there ({place} is read-only or not writable)')
  free = shutil.disk_usage(place).free
  if needed > free:
    raise OutputError(f'{path}: not enough space: {size_text(free)} free there{_needs(needed)}')


def disk_problem(e: BaseException, path: str, needed: int = 0) -> OutputError | None:
  """The `OutputError` a full or read-only disk behind `e` means, or None for any other error."""
  text = str(e)
  code = e.errno if isinstance(e, OSError) else None
  if code in _FULL_ERRNOS or any(s in text for s in _FULL_TEXT):
    try:
      free = f' ({size_text(shutil.disk_usage(_existing(path)).free)} free now)'
    except OSError:
      free = ''
    return OutputError(f'{path}: the disk is full{free}{_needs(needed)}; free some space or write elsewhere')
  if code in _DENIED_ERRNOS or any(s in text for s in _DENIED_TEXT):
    return OutputError(f'{path}: cannot write there (read-only or not permitted: {getattr(e, "strerror", None) or text})')
  return None


def remove(path: str) -> None:
  """Remove a file or directory that may not exist."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def writing(path: str, needed: int = 0, cleanup: Callable[[], None] | None = None):
  """Within: any failure runs `cleanup` (removing what was half written); a full or read-only disk
  becomes an `OutputError` naming `path`, anything else propagates unchanged."""
  try:
    yield
  except Exception as e:
    if cleanup is not None:
      with contextlib.suppress(OSError):  # a disk that refused the write may refuse this too
        cleanup()
    problem = disk_problem(e, path, needed)
    if problem is None:
      raise
    raise problem from e


def write_atomic(path: str, data: bytes) -> None:
  """Write `data` through a temporary file beside `path` and a rename, so a kill or a full disk
  leaves no partial file (a full or read-only disk is an `OutputError` naming `path`)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with writing(path, len(data), lambda: remove(tmp)):
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
