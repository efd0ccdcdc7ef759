"""One code path from 1 device to many devices and hosts: the sharded step equals the 1-device step.

Each run is a subprocess (the device count of a JAX process is fixed when it starts): 8
simulated CPU devices (`--xla_force_host_platform_device_count`), and 2 processes joined by
`jax.distributed` over localhost with CPU collectives.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name('distributed_step.py')


def _run(out, devices, *args, wait=True):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  return _finish(proc) if wait else proc


def _finish(proc):
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  out = tmp_path_factory.mktemp('single') / 'run.npz'
  _run(out, 1)
  return np.load(out)


def _assert_same_run(run, reference):
  assert int(run['devices']) > 1 and int(reference['devices']) == 1
  np.testing.assert_allclose(run['losses'], reference['losses'], rtol=1e-5, atol=1e-5)
  names = [k for k in reference.files if k not in ('losses', 'devices')]
  assert any(k.startswith('rest.image_queue') for k in names) and any('_m.' in k for k in names)
  for k in names:  # parameters (SGD: the update is the gradient), momentum encoders, queues
    np.testing.assert_allclose(run[k], reference[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize('mesh', ['8,1', '4,2'])
def test_step_on_8_devices_equals_1_device(tmp_path, single, mesh):
  out = tmp_path / 'run.npz'
  _run(out, 8, '--mesh', mesh)
  _assert_same_run(np.load(out), single)


def test_two_processes_equal_one(tmp_path, single):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  out = tmp_path / 'run.npz'
  procs = [_run(out, 1, '--process_id', str(i), '--num_processes', '2', '--port', str(port), wait=False)
           for i in range(2)]
  for proc in procs:
    _finish(proc)
  _assert_same_run(np.load(out), single)
