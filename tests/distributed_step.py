"""A few BLIP pretraining steps (ITC with momentum + queues, ITM with hard negatives, LM) on
whatever devices and processes this process finds, for tests/test_train_sharding.py.

    python distributed_step.py OUT.npz --mesh DATA,FSDP [--process_id I --num_processes N --port P]

Every process feeds only its own rows of each global batch (as the loaders do); process 0 writes
the losses and the final train state to OUT.npz.
"""

import argparse
import types

import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--mesh', default='-1,1')
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'localhost:{args.port}', args.num_processes, args.process_id)

  import optax
  from jax.experimental import multihost_utils

  from blip_jax.train import state as state_lib, tasks
  from blip_jax.train.config_base import TINY_MODELS

  task = tasks.get('pretrain')
  tokenizer = types.SimpleNamespace(vocab_size=64, bos_token_id=62, enc_token_id=63, sep_token_id=3,
                                    pad_token_id=0, cls_token_id=2)
  config = tasks.model_config(task, TINY_MODELS['blip'], tokenizer)
  data, fsdp = map(int, args.mesh.split(','))
  mesh = state_lib.make_mesh(data, fsdp)
  # Plain SGD: the parameter update is the gradient itself, so equal updates mean equal gradients.
  trainer = state_lib.Trainer(task, lambda: tasks.build_model(task, config), optax.sgd(0.5), mesh,
                              alpha_fn=lambda step: 0.4)
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
             'text_mask': mask}
    batch = {k: jax.make_array_from_process_local_data(sharding, v[rows]) for k, v in batch.items()}
    state, metrics = trainer.step(state, batch)
    losses.append([float(metrics[k]) for k in ('loss', 'itc', 'itm', 'lm', 'grad_norm')])
  flat = {state_lib.path_name(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for p, x in jax.tree_util.tree_leaves_with_path({'params': state['params'], 'rest': state['rest']})}
  if jax.process_index() == 0:
    np.savez(args.out, losses=np.asarray(losses), devices=jax.device_count(), **flat)


if __name__ == '__main__':
  main()
