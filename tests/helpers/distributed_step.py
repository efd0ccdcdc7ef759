"""A few train steps of tiny models on whatever devices and processes this process finds, for
tests/test_train_sharding.py.

    python distributed_step.py OUT_DIR --mesh DATA,FSDP [--tasks pretrain,caption,...]
        [--optim sgd|adamw] [--fsdp_min_size N] [--process_id I --num_processes N --port P]

Objectives: `pretrain` (ITC with momentum + queues, ITM with hard negatives, LM), `caption`,
`blip2_stage1` (ITC + ITM + ITG, frozen ViT) and `clip`. Every process feeds only its own rows of
each global batch (as the loaders do); process 0 writes OUT_DIR/<task>.npz: the losses, the final
params / rest / optimiser state, and the names of the state leaves sharded over 'fsdp'.
"""

import argparse
import os
import time

import jax
import numpy as np
import process_group

TOWERS = {'pretrain': ('text',), 'caption': ('text',), 'blip2_stage1': ('qformer',), 'clip': ('text',)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--mesh', default='-1,1')
  parser.add_argument('--tasks', default='pretrain')
  parser.add_argument('--optim', default='sgd', choices=('sgd', 'adamw'))
  parser.add_argument('--fsdp_min_size', type=int, default=0)
  process_group.add_flags(parser)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  process_group.join(args)
  for task in args.tasks.split(','):
    start = time.time()
    run(task, args)
    print(f'{task}: {time.time() - start:.1f}s', flush=True)


def run(name, args):
  import ml_collections
  import optax
  from jax.experimental import multihost_utils

  from blip_jax import registry
  from blip_jax.testing import tiny
  from blip_jax.train import optim
  from blip_jax.train import state as state_lib
  from blip_jax.train.config_base import base

  # One layer per tower: these runs compile each step twice (1 and 8 devices); depth adds nothing here.
  layers = {'vision': {'depth': 1}, **{tower: {'num_layers': 1} for tower in TOWERS[name]}}
  task, config, _ = tiny.build(name, **layers)
  data, fsdp = map(int, args.mesh.split(','))
  mesh = state_lib.make_mesh(data, fsdp)
  if args.optim == 'sgd':
    # Plain SGD: the parameter update is the gradient itself, so equal updates mean equal gradients.
    tx = optax.sgd(0.5)
  else:  # the optimiser of train.py: AdamW with the decay mask, a warmup schedule and clipping
    cfg = ml_collections.ConfigDict({**base().optim.to_dict(), 'schedule': 'step', 'lr': 1e-3, 'warmup_steps': 2,
                                     'warmup_lr': 1e-4, 'grad_clip': 1.0})
    tx = optim.optimizer(cfg, 2, 2)
  kwargs = {'fsdp_min_size': args.fsdp_min_size} if args.fsdp_min_size else {}
  trainer = state_lib.Trainer(task, lambda: registry.build(task.family, task.task, config), tx, mesh,
                              alpha_fn=lambda step: 0.4, loss_kwargs={'prompt_length': 2} if task.prompted else {},
                              **kwargs)
  state = trainer.init()
  sharding = state_lib.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch_size, length = 8, 12
  local = batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  losses = []
  for _ in range(args.steps):
    lengths = rng.integers(4, length + 1, batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    batch = {'image': rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
             'text_ids': np.where(mask, rng.integers(4, 60, (batch_size, length)), 0).astype(np.int32),
             'text_mask': mask, 'image_id': rng.integers(0, 6, batch_size).astype(np.int32)}
    batch = {k: jax.make_array_from_process_local_data(sharding, v[rows]) for k, v in batch.items()}
    state, metrics = trainer.step(state, batch)
    assert bool(metrics['finite']), metrics
    losses.append([float(metrics[k]) for k in sorted(metrics) if k != 'finite'])
  leaves = jax.tree_util.tree_leaves_with_path({k: state[k] for k in ('params', 'rest', 'opt_state')})
  flat = {state_lib.path_name(p): np.asarray(multihost_utils.process_allgather(x, tiled=True)) for p, x in leaves}
  sharded = [state_lib.path_name(p) for p, x in leaves if 'fsdp' in jax.tree.leaves(tuple(x.sharding.spec))]
  if jax.process_index() == 0:
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f'{name}.npz'), losses=np.asarray(losses), devices=jax.device_count(),
             fsdp_sharded=np.asarray(sharded, dtype=str), **flat)


if __name__ == '__main__':
  main()
