"""`blip-jax-predict` at scale: memory stays flat whatever the number of images (they are read a
batch at a time and each batch's rows written when it finishes), and a run killed at any moment
and started again with `--resume` writes every image exactly once, with the rows a straight run
writes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from blip_jax import model_io, registry
from blip_jax.data.tokenizer import BlipTokenizer
from blip_jax.models import blip

SIZE = 64  # big enough that holding every decoded image would show in the peak (49 KB each)
# The CLI in a process that reports its own peak RSS when it ends.
RSS = '''import resource, runpy, sys
try:
  runpy.run_module('blip_jax.predict', run_name='__main__')
except SystemExit as e:
  code = e.code
print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
'''


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, scenes_vocab):
  tok = BlipTokenizer(scenes_vocab)
  config = registry.with_tokenizer(blip.blip_config(
      'base', SIZE, vision=dict(width=32, depth=1, num_heads=2, mlp_dim=48, patch_size=16),
      text=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)), tok)
  out = tmp_path_factory.mktemp('model') / 'model'
  model_io.save(out, registry.build('blip', 'caption', config, seed=0), config, task='caption', tokenizer=tok)
  return out


def _folder(root, n):
  folder = root / f'images{n}'
  folder.mkdir()
  rng = np.random.default_rng(n)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f'{i:05d}.png')
  return folder


def _predict(checkpoint, folder, out, *extra):
  return [sys.executable, '-c', RSS, 'caption', '--checkpoint', str(checkpoint), '--beams', '1', '--max-length', '6',
          '--min-length', '2', '--batch-size', '32', '--format', 'jsonl', '--out', str(out), *extra, str(folder)]


def _peak_mib(checkpoint, folder, out):
  done = subprocess.run(_predict(checkpoint, folder, out), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return int(done.stderr.split('peak_rss_kib')[-1].split()[0]) / 1024


def test_peak_memory_is_flat_from_500_to_5000_images(checkpoint, tmp_path):
  small, large = _folder(tmp_path, 500), _folder(tmp_path, 5000)
  peaks = {n: _peak_mib(checkpoint, folder, tmp_path / f'{n}.jsonl') for n, folder in ((500, small), (5000, large))}
  rows = (tmp_path / '5000.jsonl').read_text().splitlines()
  assert len(rows) == 5000 and len({json.loads(r)['image'] for r in rows}) == 5000
  print(f'peak RSS: 500 images {peaks[500]:.0f} MiB, 5000 images {peaks[5000]:.0f} MiB')
  # Holding the 4500 more images preprocessed would add 211 MiB; allow for allocator noise.
  assert peaks[5000] - peaks[500] < 60, peaks


def test_killed_then_resumed_writes_every_image_once(checkpoint, tmp_path):
  folder = _folder(tmp_path, 400)
  straight, killed = tmp_path / 'straight.jsonl', tmp_path / 'killed.jsonl'
  assert subprocess.run(_predict(checkpoint, folder, straight), capture_output=True).returncode == 0
  proc = subprocess.Popen(_predict(checkpoint, folder, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed.exists() and killed.read_text().count('\n') >= 64):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = killed.read_text().count('\n')
  assert 64 <= partial < 400
  with open(killed, 'a') as f:
    f.write('{"image": "torn')  # a write cut short by the kill
  done = subprocess.run(_predict(checkpoint, folder, killed, '--resume'), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in killed.read_text().splitlines()]
  assert sorted(r['image'] for r in rows) == sorted(str(p) for p in folder.glob('*.png'))  # each image once
  expected = {r['image']: r for r in map(json.loads, straight.read_text().splitlines())}
  assert all(r == expected[r['image']] for r in rows)
  # Nothing left to do: a second resume keeps the file as it is.
  before = killed.read_text()
  assert subprocess.run(_predict(checkpoint, folder, killed, '--resume'), capture_output=True).returncode == 0
  assert killed.read_text() == before
