"""Optimiser and learning-rate schedules of the originals (REFERENCE.md section 9).

Schedules are functions of the optimiser step `t` (counted from 0; with `grad_accum = k` one
optimiser step is k micro-batches); `epoch = t // steps_per_epoch`. As in BLIP's `utils.py` and
LAVIS's `common/optims.py`, the warmup happens only in epoch 0: there
`lr = min(lr, warmup_lr + (lr - warmup_lr) * t / warmup_steps)`, so a `warmup_steps` longer than
an epoch is cut short at the end of epoch 0 (the originals' `if epoch == 0: warmup_lr_schedule`).
From epoch 1 on (and in epoch 0 when `warmup_steps == 0`):
- `cosine` (BLIP fine-tuning, no warmup): lr = min + (init - min) * (1 + cos(pi * epoch / epochs)) / 2,
  constant within an epoch;
- `step` (BLIP pretraining): max(min_lr, init * decay_rate ** epoch);
- `warmup_cosine` (BLIP-2, LAVIS `LinearWarmupCosineLRScheduler`): the per-epoch cosine;
- `constant`: init.
`cosine` has no warmup (BLIP's fine-tuning scripts have none); setting `warmup_steps` with it is
refused. LAVIS counts its warmup in micro-batches when it accumulates gradients; here
`warmup_steps` counts optimiser steps.

Weight decay (AdamW, decoupled) applies to matrices only: not to biases, norms or other
vectors and scalars (ndim < 2), and not to the embedding tables, position embeddings, class and
query tokens and the temperature / logit scale named in `NO_DECAY`. The originals differ among
themselves: BLIP decays every parameter, LAVIS (BLIP-2) skips ndim < 2 and names with
`bias` / `ln` / `bn`, open_clip skips ndim < 2 and `logit_scale`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'step', 'warmup_cosine', 'constant')
# Parameters without weight decay: biases, norms and scalars (ndim < 2), and these names.
NO_DECAY = re.compile(r'(embeddings|embed_positions|embed_tokens|token_embedding|positional_embedding|'
                      r'pos_embed|cls_token|class_embedding|query_tokens|temp|logit_scale)')


def schedule(cfg, steps_per_epoch: int, num_epochs: int):
  """The learning rate as a function of the optimiser step (jnp-traceable)."""
  name, init, min_lr = cfg.schedule, cfg.lr, cfg.min_lr
  if name not in SCHEDULES:
    raise ValueError(f'optim.schedule must be one of {SCHEDULES}, got {name!r}')
  warmup, warmup_lr = cfg.warmup_steps, cfg.warmup_lr

  if name == 'cosine' and warmup:
    raise ValueError(f'optim.schedule=cosine has no warmup (got warmup_steps={warmup}); '
                     f"use 'warmup_cosine' or warmup_steps=0")

  def lr(step):
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    cosine = min_lr + (init - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / max(num_epochs, 1)))
    after = {'cosine': cosine, 'warmup_cosine': cosine, 'constant': jnp.full((), init, jnp.float32),
             'step': jnp.maximum(min_lr, init * cfg.decay_rate ** epoch)}[name]
    if warmup == 0:
      return after
    ramp = jnp.minimum(init, warmup_lr + (init - warmup_lr) * step / warmup)
    return jnp.where(step < steps_per_epoch, ramp, after)

  return lr


def path_name(path) -> str:
  """A pytree path as the dotted attribute path (`text_encoder.encoder.layer.0....`)."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def decay_mask(params):
  """True where weight decay applies (matrices other than embeddings and tokens)."""
  def decays(path, x):
    return x.ndim >= 2 and not NO_DECAY.search(path_name(path))
  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg, steps_per_epoch: int, num_epochs: int) -> optax.GradientTransformation:
  """AdamW (decay 0.05 by default) on the schedule, optional clipping and accumulation."""
  lr = schedule(cfg, steps_per_epoch, num_epochs)
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx
