"""One writer per workdir: `workdir/LOCK` names the process that holds it (host, pid).

A second run on the same workdir refuses to start (two writers would interleave metrics.jsonl and
race on the checkpoints). A lock left by a process that died (kill -9) is recognised on the same
host by its pid (and the process's start time, so a reused pid is not mistaken for the holder) and
replaced with a warning; a lock from another host cannot be checked, and the message says how to
clear it. Only the first process of a multi-host run takes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

from blip_jax import distributed

log = logging.getLogger('blip_jax.train')

LOCK_FILE = 'LOCK'


class WorkdirLocked(RuntimeError):
  pass


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None where it cannot be read."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # another machine's process: nothing here can tell
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return holder.get('start_time') in (None, _start_time(pid))


def _holder(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def hold(workdir: str):
  """Hold `workdir`'s lock for the duration of the block."""
  if not distributed.is_primary():
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'start_time': _start_time(os.getpid()),
        'since': time.strftime('%Y-%m-%d %H:%M:%S')}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      break
    except FileExistsError:
      holder = _holder(path)
      try:
        young = time.time() - os.path.getmtime(path) < 5  # a starting run may not have written it yet
      except FileNotFoundError:
        continue  # its holder just ended: try again
      if (holder is None and young) or (holder is not None and _alive(holder)):
        who = (f'pid {holder.get("pid")} on {holder.get("host")} since {holder.get("since")}' if holder
               else 'a run that is starting')
        raise WorkdirLocked(f'{workdir} is in use by {who} ({path}). Wait for that run to end, pick another '
                            f'--workdir, or delete {path} if that process is gone.') from None
      log.warning('removing the stale lock %s left by %s', path, holder or 'an unreadable lock file')
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  with os.fdopen(fd, 'w') as f:
    json.dump(me, f)
  try:
    yield
  finally:
    if _holder(path) == me:
      os.remove(path)
