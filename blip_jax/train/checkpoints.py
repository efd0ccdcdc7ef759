"""A run's checkpoints in `workdir/checkpoints` (orbax): save, and resume from the newest one that
restores.

A checkpoint that does not restore (a truncated file, a damaged manifest, a missing item) is
named with what is wrong, moved to `workdir/checkpoints_damaged/` (never deleted) and the run
continues from the one before it. When none restores the run stops with one error listing them
all and leaves them where they are.

Saving onto a full or read-only disk stops the run with one `storage.OutputError` naming the
checkpoint directory and the bytes needed; the half-written `N.orbax-checkpoint-tmp` is removed
and the checkpoints before it stay usable.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from blip_jax import distributed, storage

log = logging.getLogger('blip_jax.train')

DAMAGED_DIR = 'checkpoints_damaged'


class NoUsableCheckpoint(RuntimeError):
  pass


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                               item_names=('state', 'data'))


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  """Starts writing checkpoint `step` (orbax finishes it in the background: see `finish`)."""
  needed = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state))
  with _writing(mgr, needed):
    # Every process checks (not only the first), so that none goes on into orbax's save and
    # waits there for one that stopped.
    storage.check_writable(os.fspath(mgr.directory), needed)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


def finish(mgr: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; its disk errors surface here."""
  with _writing(mgr):
    mgr.wait_until_finished()


@contextlib.contextmanager
def _writing(mgr, needed: int = 0):
  folder = os.fspath(mgr.directory)

  def cleanup():
    with contextlib.suppress(Exception):  # the background write ends, with the same error
      mgr.wait_until_finished()
    if distributed.is_primary():
      for partial in glob.glob(os.path.join(folder, '*.orbax-checkpoint-tmp*')):
        storage.remove(partial)

  with storage.writing(folder, needed, cleanup):
    yield


def _restore(mgr, step, abstract):
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       data=ocp.args.JsonRestore()))
  data = restored['data']
  if not isinstance(data, dict) or not isinstance(data.get('step'), int):
    raise ValueError(f'its data item is {data!r}, expected a JSON object with an integer "step"')
  return restored['state'], data


def _reason(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


def _move_aside(workdir: str, step: int) -> str:
  target_dir = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, f'{step}-{time.strftime("%Y%m%dT%H%M%S")}')
  os.rename(os.path.join(directory(workdir), str(step)), target)
  return target


def restore_latest(workdir: str, keep: int, abstract):
  """(manager, state, data_state) from the newest checkpoint that restores into `abstract` (a tree
  of ShapeDtypeStructs with shardings), or (manager, None, None) when there is none."""
  mgr = manager(workdir, keep)
  damaged = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, data = _restore(mgr, step, abstract)
    except Exception as e:  # noqa: BLE001 - whatever orbax, tensorstore or json raise, the step is unusable
      damaged.append((step, _reason(e)))
      # A failed restore can leave the manager's async machinery unusable: a fresh one per try.
      mgr.close()
      mgr = manager(workdir, keep)
      continue
    if damaged:
      _set_aside(workdir, damaged, step)
      mgr.close()
      mgr = manager(workdir, keep)  # it listed the steps just moved
    return mgr, state, data
  if damaged:
    listing = '\n'.join(f'  {os.path.join(directory(workdir), str(s))}: {why}' for s, why in damaged)
    raise NoUsableCheckpoint(
        f'no checkpoint in {directory(workdir)} restores:\n{listing}\nThey were left in place. Move them '
        f'elsewhere (or pick another --workdir) to start from scratch.')
  return mgr, None, None


def _set_aside(workdir, damaged, good_step):
  moved = {}
  if distributed.is_primary():
    moved = {step: _move_aside(workdir, step) for step, _ in damaged}
  distributed.barrier('checkpoints: damaged ones moved aside')
  for step, why in damaged:
    log.warning('checkpoint %s does not restore (%s); moved to %s; resuming from step %d instead',
                os.path.join(directory(workdir), str(step)), why, moved.get(step, DAMAGED_DIR), good_step)
