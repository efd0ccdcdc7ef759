"""One code path from 1 device to many devices and hosts: the sharded step equals the 1-device step,
with the data axis alone, with parameters and optimiser state split over an fsdp axis, with SGD
(equal updates = equal gradients) and with train.py's AdamW; and the whole train.py on 2 hosts
trains, checkpoints, evaluates and saves what 1 host does.

Each run is a subprocess (the device count of a JAX process is fixed when it starts): 8
simulated CPU devices (`--xla_force_host_platform_device_count`), and 2 processes joined by
`jax.distributed` over localhost with CPU collectives.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from blip_jax.models.variables import unique_weights

SCRIPT = pathlib.Path(__file__).parents[1] / 'helpers' / 'distributed_step.py'
ROOT = pathlib.Path(__file__).parents[2]


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
  """BLIP pretraining with SGD on 1 device."""
  out = tmp_path_factory.mktemp('single')
  _run(out, 1)
  return np.load(out / 'pretrain.npz')


# blip2_stage1 passes this test as well (its frozen ViT sharded over fsdp included) but compiles
# for about a minute on 2 cores: add it here when touching the Q-Former or its losses.
ADAMW_TASKS = ('caption', 'clip')


@pytest.fixture(scope='module')
def single_adamw(tmp_path_factory):
  """Captioning and CLIP with train.py's AdamW (decay mask, warmup, clipping) on 1 device."""
  out = tmp_path_factory.mktemp('single_adamw')
  _run(out, 1, '--tasks', ','.join(ADAMW_TASKS), '--optim', 'adamw')
  return {t: np.load(out / f'{t}.npz') for t in ADAMW_TASKS}


def _assert_same_run(run, reference, task='pretrain'):
  assert int(run['devices']) > 1 and int(reference['devices']) == 1
  np.testing.assert_allclose(run['losses'], reference['losses'], rtol=1e-5, atol=1e-5)
  names = [k for k in reference.files if k not in ('losses', 'devices', 'fsdp_sharded')]
  assert sorted(names) == sorted(k for k in run.files if k not in ('losses', 'devices', 'fsdp_sharded'))
  if task == 'pretrain':
    assert any(k.startswith('rest.image_queue') for k in names) and any('_m.' in k for k in names)
  # Parameters (with SGD the update is the gradient; with AdamW the first moment is a running
  # mean of the gradients), optimiser state, frozen weights, momentum encoders, queues.
  for k in names:
    np.testing.assert_allclose(run[k], reference[k], rtol=1e-5, atol=1e-5, err_msg=k)


def _fsdp_sharded(run):
  """Names of the parameters (and their AdamW moments) that the run split over 'fsdp'."""
  sharded = [str(n) for n in run['fsdp_sharded']]
  params = [n for n in sharded if n.startswith('params.')]
  assert params, sharded
  return params, sharded


# '2,4' shards every state leaf of at least 256 elements over the 4-way fsdp axis (the default
# threshold, 16384, is above every tiny parameter).
@pytest.mark.parametrize('mesh', ['8,1', '2,4'])
def test_step_on_8_devices_equals_1_device(tmp_path, single, mesh):
  _run(tmp_path, 8, '--mesh', mesh, '--fsdp_min_size', '256')
  run = np.load(tmp_path / 'pretrain.npz')
  _assert_same_run(run, single)
  if mesh == '2,4':
    params, sharded = _fsdp_sharded(run)
    assert 'params.visual_encoder.blocks.0.mlp.fc1.kernel..value' in params
    assert any(n.startswith('rest.visual_encoder_m.') for n in sharded)  # the momentum encoder too
  else:
    assert len(run['fsdp_sharded']) == 0


def test_adamw_steps_with_fsdp_on_8_devices_equal_1_device(tmp_path, single_adamw):
  _run(tmp_path, 8, '--mesh', '2,4', '--fsdp_min_size', '256', '--tasks', ','.join(ADAMW_TASKS), '--optim', 'adamw')
  for task in ADAMW_TASKS:
    run = np.load(tmp_path / f'{task}.npz')
    _assert_same_run(run, single_adamw[task], task)
    params, sharded = _fsdp_sharded(run)
    assert any(n.startswith('opt_state.') for n in sharded), task  # the AdamW moments follow their parameters
    if task == 'blip2_stage1':
      assert any(n.startswith('rest.visual_encoder.') for n in sharded)  # the frozen ViT, outside the optimiser


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _train_py(workdir, data_dir, devices, env=(), args=()):
  """`train.py` on the tiny default (ITC + ITM + LM, then retrieval and caption evaluation)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu',
         **dict(env)}
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'train.py'), '--config', str(ROOT / 'configs/default.py:tiny'),
       '--workdir', str(workdir), f'--config.data.data_dir={data_dir}', '--config.num_steps=2', *args],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_hosts(workdir, data_dir, *args):
  """`train.py` as two hosts of one device each, joined over localhost; returns their outputs."""
  port = _free_port()
  # No persistent compilation cache for the two (tests/helpers/process_group.py says why).
  procs = [_train_py(workdir, data_dir, 1, {'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
                                            'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i),
                                            'JAX_ENABLE_COMPILATION_CACHE': 'false'}, args)
           for i in range(2)]
  outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  return outputs


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _train_state(workdir, step):
  """The orbax checkpoint of `step` as {name: numpy array}: parameters, AdamW moments, momentum
  encoders, queues and RNG state."""
  import jax
  import orbax.checkpoint as ocp
  path = workdir / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  leaves = jax.tree_util.tree_flatten_with_path(checkpointer.restore(path, restore_args=as_numpy))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_same_metrics(a, b):
  keys = [k for k in sorted(a) if not k.startswith('speed/')]  # all but the timings
  assert sorted(a) == sorted(b)
  np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-5, atol=1e-6, err_msg=keys)


def test_train_py_on_two_hosts_equals_one_host(tmp_path, scenes_dir):
  """The whole `train.py` on 2 processes (the README's multi-host launch, over localhost) trains,
  evaluates and saves exactly what one process with the same 2 devices does: the checkpointed
  train state (parameters, AdamW moments, momentum encoders, queues), evaluation (each batch's
  rows gathered from both hosts), and the model, written once and loading on one device.
  Then the two hosts evaluate that saved model (`eval_only` + `init_from`) to the same numbers."""
  import blip_jax
  data_dir = scenes_dir
  _finish(_train_py(tmp_path / 'one', data_dir, 2))
  outputs = _two_hosts(tmp_path / 'two', data_dir)
  assert 'retrieval/i2t_r1' in outputs[0] and 'eval:' not in outputs[1]  # one report per run
  one, two = _metrics(tmp_path / 'one'), _metrics(tmp_path / 'two')
  assert len(one) == len(two) == 3 and 'retrieval/t2i_r1' in one[-1] and 'caption/bleu4' in one[-1]
  for a, b in zip(one, two):
    _assert_same_metrics(a, b)
  states = [_train_state(tmp_path / run, 2) for run in ('one', 'two')]
  assert states[0].keys() == states[1].keys()
  names = list(states[0])
  assert any('image_queue' in k for k in names) and any('_m' in k for k in names) and any('opt_state' in k for k in names)
  for k in names:
    np.testing.assert_allclose(states[1][k], states[0][k], rtol=1e-5, atol=1e-5, err_msg=k)
  saved = [blip_jax.load(tmp_path / run / 'model')[0] for run in ('one', 'two')]
  weights = [unique_weights(m) for m in saved]
  assert weights[0].keys() == weights[1].keys()
  for k in weights[0]:
    np.testing.assert_allclose(weights[1][k].get_value(), weights[0][k].get_value(), atol=1e-6, err_msg=k)
  assert (tmp_path / 'two' / 'model' / 'vocab.txt').read_text() == (tmp_path / 'one' / 'model' / 'vocab.txt').read_text()

  _two_hosts(tmp_path / 'eval', data_dir, '--config.eval_only=True', f'--config.init_from={tmp_path / "one" / "model"}')
  _assert_same_metrics(one[-1], _metrics(tmp_path / 'eval')[-1])
