"""Optimiser and learning-rate schedules of the originals (REFERENCE.md section 9).

Schedules are functions of the optimiser step; the originals' per-epoch rules use
`steps_per_epoch` to find the epoch:
- `cosine` (BLIP fine-tuning): lr = min + (init - min) * (1 + cos(pi * epoch / epochs)) / 2,
  constant within an epoch;
- `step` (BLIP pretraining): linear warmup from `warmup_lr` over `warmup_steps`, then
  max(min_lr, init * decay_rate ** epoch);
- `warmup_cosine` (BLIP-2): linear warmup over `warmup_steps` (within the first epoch), then
  the per-epoch cosine.
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
  name, init, min_lr = cfg.schedule, cfg.lr, cfg.get('min_lr', 0.0)
  if name not in SCHEDULES:
    raise ValueError(f'optim.schedule must be one of {SCHEDULES}, got {name!r}')
  warmup, warmup_lr = cfg.get('warmup_steps', 0), cfg.get('warmup_lr', 0.0)

  def lr(step):
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    cosine = min_lr + (init - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / max(num_epochs, 1)))
    after = {'cosine': cosine, 'warmup_cosine': cosine, 'constant': jnp.asarray(init, jnp.float32),
             'step': jnp.maximum(min_lr, init * cfg.get('decay_rate', 1.0) ** epoch)}[name]
    if name == 'cosine' or warmup == 0:
      return after
    ramp = warmup_lr + (init - warmup_lr) * jnp.minimum(step, warmup) / warmup
    return jnp.where(step < warmup, ramp, after)

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
  if cfg.get('grad_clip'):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.999), eps=cfg.get('eps', 1e-8),
                           weight_decay=cfg.get('weight_decay', 0.05), mask=decay_mask))
  tx = optax.chain(*parts)
  if cfg.get('grad_accum', 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx
