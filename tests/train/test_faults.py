"""Faults around a run's workdir: damaged checkpoints, a second writer, metrics rows written twice."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from blip_jax.testing import tiny
from blip_jax.train import checkpoints, lock, loop


def _config(data_dir, num_steps):
  c = tiny.config('default')
  c.data.data_dir = data_dir
  c.update(num_steps=num_steps, checkpoint_every_steps=2, keep_checkpoints=5, eval_every_steps=0)
  return c


@pytest.fixture(scope='module')
def trained(scenes_dir, tmp_path_factory):
  """A tiny run stopped at step 4 with checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp('trained')
  loop.train_and_evaluate(_config(scenes_dir, 4), str(workdir))
  return workdir


def _largest(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(p: pathlib.Path):
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    'truncated data file': lambda step: _truncate(_largest(step / 'state' / 'ocdbt.process_0' / 'd')),
    'truncated manifest': lambda step: _truncate(step / 'state' / 'manifest.ocdbt'),
    'garbage json': lambda step: (step / 'data' / 'metadata').write_text('{"step": 4, tru'),
    'deleted state item': lambda step: shutil.rmtree(step / 'state'),
}


def _rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _each_metric_once(workdir):
  seen = [(row['step'], k) for row in _rows(workdir) for k in row if k != 'step']
  assert len(seen) == len(set(seen)), sorted(x for x in seen if seen.count(x) > 1)


@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    damage, trained, scenes_dir, tmp_path, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  DAMAGE[damage](workdir / 'checkpoints' / '4')
  with caplog.at_level('INFO', logger='blip_jax.train'):
    loop.train_and_evaluate(_config(scenes_dir, 6), str(workdir))
  text = caplog.text
  assert 'checkpoints/4 does not restore' in text and 'resuming from step 2' in text, text
  assert 'at step 2' in text
  moved = list((workdir / checkpoints.DAMAGED_DIR).iterdir())
  assert [p.name.split('-')[0] for p in moved] == ['4'], moved  # kept, not deleted
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4, 6]
  train_steps = [r['step'] for r in _rows(workdir) if 'train/loss' in r]
  assert train_steps == list(range(1, 7))
  _each_metric_once(workdir)


def test_when_no_checkpoint_restores_the_run_stops_naming_them_and_moves_nothing(trained, scenes_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  for step in (2, 4):
    DAMAGE['deleted state item'](workdir / 'checkpoints' / str(step))
  with pytest.raises(checkpoints.NoUsableCheckpoint, match=r'(?s)checkpoints/4: .*checkpoints/2: .*left in place'):
    loop.train_and_evaluate(_config(scenes_dir, 6), str(workdir))
  assert not (workdir / checkpoints.DAMAGED_DIR).exists()
  assert (workdir / 'checkpoints' / '4').exists() and (workdir / 'checkpoints' / '2').exists()


def test_a_rerun_of_a_finished_run_and_an_eval_only_run_log_no_metric_twice(trained, scenes_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  before = _rows(workdir)
  loop.train_and_evaluate(_config(scenes_dir, 4), str(workdir))
  config = _config(scenes_dir, 4)
  config.eval_only = True
  loop.train_and_evaluate(config, str(workdir))
  after = _rows(workdir)
  _each_metric_once(workdir)
  assert [r['step'] for r in after] == [r['step'] for r in before]


def test_rows_a_run_killed_before_its_first_checkpoint_wrote_are_dropped(trained, scenes_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  # What a run killed at step 1 leaves: a metrics row and no checkpoint.
  (workdir / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'train/loss': 99.0}) + '\n')
  loop.train_and_evaluate(_config(scenes_dir, 2), str(workdir))
  _each_metric_once(workdir)
  assert [r['train/loss'] for r in _rows(workdir) if r['step'] == 1] != [99.0]


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    (tmp_path / lock.LOCK_FILE).write_text(json.dumps(
        {'host': os.uname().nodename, 'pid': holder.pid, 'start_time': lock._start_time(holder.pid), 'since': 'now'}))
    refused = pytest.raises(lock.WorkdirLocked, match=rf'in use by pid {holder.pid} on .*delete .*LOCK')
    with refused, lock.hold(str(tmp_path)):
      pass
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / lock.LOCK_FILE).exists()  # the holder's lock is not touched


def test_a_lock_left_by_a_dead_process_is_replaced_and_released_at_the_end(tmp_path, caplog):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({'host': os.uname().nodename, 'pid': int(dead.stdout)}))
  with caplog.at_level('WARNING', logger='blip_jax.train'), lock.hold(str(tmp_path)):
    holder = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert holder['pid'] == os.getpid()
  assert 'stale lock' in caplog.text
  assert not (tmp_path / lock.LOCK_FILE).exists()


def test_train_py_refuses_a_locked_workdir_with_one_line(tmp_path, scenes_dir):
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({'host': 'another-host', 'pid': 1, 'since': 'earlier'}))
  out = subprocess.run([sys.executable, str(pathlib.Path(__file__).parents[2] / 'train.py'), '--config',
                        'default:tiny', '--workdir', str(tmp_path), f'--config.data.data_dir={scenes_dir}'],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'error: ' in out.stderr and 'in use by pid 1 on another-host' in out.stderr
  assert 'Traceback' not in out.stderr


def _disk_fills_while_orbax_writes(self, step, *args, **kwargs):
  partial = pathlib.Path(self.directory) / f'{step}.orbax-checkpoint-tmp'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'half_written').write_bytes(b'x' * 100)
  raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{partial}/state/d/0": No space left on device')


def _too_little_space(path):
  return shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)


@pytest.mark.parametrize('fault', ['full mid-write', 'too little space', 'read-only'])
def test_a_full_or_read_only_disk_stops_the_run_with_one_error_and_leaves_no_partial_checkpoint(
    fault, trained, scenes_dir, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  from blip_jax import storage
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  with monkeypatch.context() as m:
    if fault == 'full mid-write':
      m.setattr(ocp.CheckpointManager, 'save', _disk_fills_while_orbax_writes)
      message = 'checkpoints: the disk is full'
    elif fault == 'too little space':
      m.setattr(shutil, 'disk_usage', _too_little_space)
      message = r'checkpoints: not enough space: 1000 bytes free there; about \d+\.\d [KM]iB needed'
    else:
      access = os.access
      m.setattr(os, 'access', lambda path, mode: not str(path).startswith(str(tmp_path)) and access(path, mode))
      message = r'checkpoints: cannot write there \(.*checkpoints is read-only or not writable\)'
    with pytest.raises(storage.OutputError, match=rf'^{workdir}/{message}'):
      loop.train_and_evaluate(_config(scenes_dir, 6), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']  # no *.orbax-checkpoint-tmp
  loop.train_and_evaluate(_config(scenes_dir, 6), str(workdir))  # space freed: the run resumes from step 4
  assert [r['step'] for r in _rows(workdir) if 'train/loss' in r] == list(range(1, 7))
  _each_metric_once(workdir)
