"""The optimiser of train.py against independent statements of the originals' rules.

Schedules: BLIP's `utils.py` (`warmup_lr_schedule` in epoch 0 only, `step_lr_schedule`,
`cosine_lr_schedule` per epoch) and LAVIS's `LinearWarmupCosineLRScheduler`, written below as
the originals' epoch / iteration loops in plain Python. AdamW: torch's update written out in
numpy. Then the train step's gradient accumulation, clipping, freezing, bf16 and remat.
"""

import math
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from blip_jax import registry
from blip_jax.testing import tiny
from blip_jax.train import objectives, optim
from blip_jax.train import state as state_lib
from blip_jax.train.config_base import base

TOKENIZER = types.SimpleNamespace(vocab_size=64, bos_token_id=62, enc_token_id=63, sep_token_id=3, pad_token_id=0,
                                  cls_token_id=2)


def _optim(**fields):
  c = base().optim
  c.update(fields)
  return c


# ----------------------------------------------------------------------------- schedules
# The originals set the lr before each iteration i of epoch e; the list is indexed by the global
# iteration e * steps_per_epoch + i, which is the optimiser step our schedule receives.


def _blip_warmup(i, warmup_steps, warmup_lr, init_lr):
  return min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / max(warmup_steps, 1))


def blip_pretrain_lrs(spe, epochs, init_lr, min_lr, decay_rate, warmup_steps, warmup_lr):
  """BLIP pretrain.py: step_lr_schedule at each epoch start, warmup_lr_schedule for i in epoch 0."""
  out = []
  for epoch in range(epochs):
    lr = max(min_lr, init_lr * decay_rate ** epoch)
    for i in range(spe):
      if epoch == 0:
        lr = _blip_warmup(i, warmup_steps, warmup_lr, init_lr)
      out.append(lr)
  return out


def blip_cosine_lrs(spe, epochs, init_lr, min_lr):
  """BLIP's fine-tuning scripts: cosine_lr_schedule(epoch) at each epoch start, no warmup."""
  return [(init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr
          for epoch in range(epochs) for _ in range(spe)]


def lavis_warmup_cosine_lrs(spe, epochs, init_lr, min_lr, warmup_steps, warmup_lr):
  """LAVIS LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step) before every iteration."""
  out = []
  for epoch in range(epochs):
    for i in range(spe):
      if epoch == 0:
        out.append(_blip_warmup(i, warmup_steps, warmup_lr, init_lr))
      else:
        out.append((init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr)
  return out


def _ours(cfg, spe, epochs):
  fn = jax.jit(jax.vmap(optim.schedule(cfg, spe, epochs)))
  return np.asarray(fn(jnp.arange(spe * epochs, dtype=jnp.int32)))


# warmup shorter than an epoch (the configs), longer than an epoch (cut at the end of epoch 0,
# as in the originals), and exactly one epoch.
@pytest.mark.parametrize('spe,warmup', [(10, 4), (7, 10), (5, 5)])
def test_step_schedule_equals_blip_pretraining(spe, warmup):
  cfg = _optim(schedule='step', lr=3e-4, min_lr=1e-6, decay_rate=0.9, warmup_steps=warmup, warmup_lr=1e-6)
  expected = blip_pretrain_lrs(spe, 5, 3e-4, 1e-6, 0.9, warmup, 1e-6)
  np.testing.assert_allclose(_ours(cfg, spe, 5), expected, rtol=1e-6)
  # min_lr binds late in a long run
  cfg = _optim(schedule='step', lr=1e-3, min_lr=5e-4, decay_rate=0.5, warmup_steps=warmup, warmup_lr=0.0)
  np.testing.assert_allclose(_ours(cfg, spe, 4), blip_pretrain_lrs(spe, 4, 1e-3, 5e-4, 0.5, warmup, 0.0), rtol=1e-6)


@pytest.mark.parametrize('spe,warmup', [(10, 4), (7, 10), (5, 5)])
def test_warmup_cosine_schedule_equals_lavis(spe, warmup):
  cfg = _optim(schedule='warmup_cosine', lr=1e-4, min_lr=1e-5, warmup_steps=warmup, warmup_lr=1e-6)
  np.testing.assert_allclose(_ours(cfg, spe, 6), lavis_warmup_cosine_lrs(spe, 6, 1e-4, 1e-5, warmup, 1e-6),
                             rtol=1e-6)


def test_cosine_and_constant_schedules():
  cfg = _optim(schedule='cosine', lr=1e-5, min_lr=1e-7)
  np.testing.assert_allclose(_ours(cfg, 3, 6), blip_cosine_lrs(3, 6, 1e-5, 1e-7), rtol=1e-6)
  np.testing.assert_allclose(_ours(_optim(schedule='constant', lr=2e-4), 3, 2), [2e-4] * 6, rtol=1e-7)
  with pytest.raises(ValueError, match='cosine has no warmup'):
    optim.schedule(_optim(schedule='cosine', warmup_steps=3), 3, 2)
  with pytest.raises(ValueError, match='must be one of'):
    optim.schedule(_optim(schedule='linear'), 3, 2)


# ----------------------------------------------------------------------- weight decay mask


def _decayed_by_rule(name):
  """Which parameters decay, stated independently of optim.NO_DECAY: the weight matrices of
  linear and conv layers (`kernel`) and CLIP's two projection matrices, nothing else."""
  return name.endswith('.kernel') or name in ('visual.proj', 'text_projection')


@pytest.mark.parametrize('name,family', [('pretrain', 'blip'), ('blip2_stage1', 'blip2'), ('clip', 'clip')])
def test_weight_decay_mask_of_each_family(name, family):
  task, config, _ = tiny.build(name)
  model = nnx.eval_shape(lambda: registry.build(family, task.task, config))
  _, params, _ = nnx.split(model, state_lib.trainable_filter(task.frozen), ...)
  mask = optim.decay_mask(params)
  got = {re.sub(r'\.+value$', '', optim.path_name(p)): bool(m)
         for (p, _), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask))}
  expected = {n: _decayed_by_rule(n) for n in got}
  assert got == expected, {n: v for n, v in got.items() if v != expected[n]}
  # Spot checks of the names the rule is about, so a renamed parameter cannot slip through.
  no_decay = {'pretrain': ['temp', 'visual_encoder.cls_token', 'visual_encoder.pos_embed',
                           'text_decoder.bert.embeddings.word_embeddings.embedding',
                           'text_decoder.bert.embeddings.position_embeddings.embedding',
                           'visual_encoder.norm.scale', 'itm_head.bias'],
              'blip2_stage1': ['query_tokens', 'temp', 'ln_vision.scale', 'Qformer.bert.embeddings.word_embeddings.embedding'],
              'clip': ['logit_scale', 'positional_embedding', 'token_embedding.embedding', 'visual.cls_token',
                       'visual.pos_embed', 'ln_final.scale']}[name]
  assert all(n in got and not got[n] for n in no_decay), [n for n in no_decay if got.get(n, True)]
  assert sum(got.values()) > 10


# ------------------------------------------------------------------- AdamW, clip, accumulate


def _toy_params():
  rng = np.random.default_rng(0)
  return {'dense': {'kernel': rng.normal(size=(4, 3)).astype(np.float32), 'bias': rng.normal(size=3).astype(np.float32)},
          'embeddings': {'word_embeddings': {'embedding': rng.normal(size=(6, 4)).astype(np.float32)}},
          'temp': np.float32(0.07)}


def _torch_adamw(params, grads_seq, lrs, *, wd, decays, clip=0.0, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW (+ clip_grad_norm_ without its 1e-6) written out on flat numpy arrays."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    if clip:
      norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
      g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    for k in p:
      if decays[k]:
        p[k] = p[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


def _flat(tree):
  return {optim.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_adamw_with_the_mask_schedule_and_clipping_equals_torch_adamw_by_hand(clip):
  params = _toy_params()
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: (3 * rng.normal(size=np.shape(x))).astype(np.float32), params)
               for _ in range(7)]
  cfg = _optim(schedule='step', lr=1e-2, warmup_steps=3, warmup_lr=1e-3, decay_rate=0.5, min_lr=0.0,
               weight_decay=0.3, grad_clip=clip)
  spe, epochs = 3, 3
  tx = optim.optimizer(cfg, spe, epochs)
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  decays = {'dense.kernel': True, 'dense.bias': False, 'embeddings.word_embeddings.embedding': False, 'temp': False}
  lrs = blip_pretrain_lrs(spe, epochs, 1e-2, 0.0, 0.5, 3, 1e-3)
  expected = _torch_adamw(_flat(params), [_flat(g) for g in grads_seq], lrs, wd=0.3, decays=decays, clip=clip)
  got = _flat(p)
  assert got.keys() == expected.keys()
  for k in got:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The decay made a difference where it applies: without it the kernel ends elsewhere.
  no_wd = _torch_adamw(_flat(params), [_flat(g) for g in grads_seq], lrs, wd=0.0, decays=decays, clip=clip)
  assert np.abs(no_wd['dense.kernel'] - got['dense.kernel']).max() > 1e-4
  np.testing.assert_allclose(no_wd['dense.bias'], got['dense.bias'], rtol=1e-5, atol=1e-6)


def test_grad_accum_k_equals_one_step_on_the_mean_gradient():
  params = _toy_params()
  rng = np.random.default_rng(2)
  micro = [jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params) for _ in range(6)]
  cfg = _optim(schedule='step', lr=1e-2, warmup_steps=1, warmup_lr=1e-3, decay_rate=0.5, grad_clip=1.0)
  accum = optim.optimizer(ml_collections.ConfigDict({**cfg.to_dict(), 'grad_accum': 3}), 1, 2)
  plain = optim.optimizer(cfg, 1, 2)
  sa, sp, pa, pp = accum.init(params), plain.init(params), params, params
  for i, g in enumerate(micro):
    updates, sa = accum.update(g, sa, pa)
    pa = optax.apply_updates(pa, updates)
    if i % 3 == 2:  # the k-th micro-batch applies one step on the mean of the k gradients
      mean = jax.tree.map(lambda *x: sum(x) / 3, *micro[i - 2:i + 1])
      updates, sp = plain.update(mean, sp, pp)
      pp = optax.apply_updates(pp, updates)
    else:
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), pa, pp)  # nothing applied yet
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), pa, pp)
  assert not np.allclose(pa['dense']['kernel'], params['dense']['kernel'])


# ------------------------------------------------------------------------- the train step


def _caption(dropout=0.0, dtype='', **model):
  """The tiny captioner with one layer per tower (these tests compile many steps), dropout off
  unless asked, so that steps are comparable."""
  fields = {**model, 'text': {'num_layers': 1, 'hidden_dropout': dropout, 'attention_dropout': dropout},
            'vision': {'depth': 1, **model.get('vision', {})}}
  return objectives.get('caption'), tiny.model_config('caption', dtype=dtype, **fields)


def _caption_batch(n, seed=0, length=10):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 60, (n, length)).astype(np.int32)
  ids[:, 0] = 2
  # Equal token counts per example: the caption loss is a mean over tokens (as BLIP's), so the
  # mean of k micro-batch losses is the loss of their concatenation only then.
  return {'image': rng.normal(size=(n, 32, 32, 3)).astype(np.float32), 'text_ids': ids,
          'text_mask': np.ones_like(ids)}


def _trainer(task, config, tx, **kwargs):
  return state_lib.Trainer(task, lambda: registry.build(task.family, task.task, config), tx, state_lib.make_mesh(),
                           loss_kwargs={'prompt_length': 2}, **kwargs)


def _leaves(tree):
  return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_grad_accum_over_k_micro_batches_equals_one_step_on_their_concatenation():
  """Caption (a per-token mean with equal token counts): 2 micro-batches of 4 = 1 batch of 8.
  Contrastive losses (ITC, InfoNCE, hard negatives) are not sums over examples, so there
  accumulation is not the big batch (blip_jax/train/config_base.py says so)."""
  task, config = _caption()
  cfg = _optim(schedule='constant', lr=1e-3, grad_clip=1.0)
  big = _caption_batch(8)
  accum = _trainer(task, config, optim.optimizer(ml_collections.ConfigDict({**cfg.to_dict(), 'grad_accum': 2}), 1, 1))
  plain = _trainer(task, config, optim.optimizer(cfg, 1, 1))
  sa, sp = accum.init(), plain.init()
  before = _leaves(sp['params'])
  losses = []
  for half in (slice(0, 4), slice(4, 8)):
    sa, metrics = accum.step(sa, {k: v[half] for k, v in big.items()})
    losses.append(float(metrics['loss']))
  sp, metrics = plain.step(sp, big)
  np.testing.assert_allclose(np.mean(losses), metrics['loss'], rtol=1e-6)
  a, p = _leaves(sa['params']), _leaves(sp['params'])
  for k in p:
    np.testing.assert_allclose(a[k], p[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert np.mean([not np.array_equal(p[k], before[k]) for k in p]) > 0.9


def test_freeze_by_regex_keeps_those_parameters_and_trains_the_rest():
  task, config = _caption()
  frozen = (r'^visual_encoder\.blocks\.0\.', r'\.LayerNorm\.')
  trainer = _trainer(task, config, optim.optimizer(_optim(schedule='constant', lr=1e-3), 1, 1), frozen=frozen)
  state = trainer.init()
  names = set(_leaves(state['params']))
  assert not any(re.search(f, n) for f in frozen for n in names)
  before = {**_leaves(state['params']), **_leaves(state['rest'])}
  for seed in range(2):
    state, metrics = trainer.step(state, _caption_batch(4, seed))
    assert metrics['finite']
  after = {**_leaves(state['params']), **_leaves(state['rest'])}
  frozen_names = [n for n in after if any(re.search(f, n) for f in frozen)]
  assert len(frozen_names) >= 8 and all(np.array_equal(after[n], before[n]) for n in frozen_names)
  changed = [n for n in names if not np.array_equal(after[n], before[n])]
  assert len(changed) == len(names), sorted(names - set(changed))


def _loss_and_grads(config, batch):
  """The caption loss and its gradients as the train step computes them: one step of SGD with
  lr 1 changes the parameters by exactly minus the gradient."""
  task = objectives.get('caption')
  trainer = _trainer(task, config, optax.sgd(1.0))
  state = trainer.init()
  before = _leaves(state['params'])
  state, metrics = trainer.step(state, batch)
  after = _leaves(state['params'])
  assert metrics['finite'] and all(x.dtype == np.float32 for x in after.values())  # fp32 parameters, whatever dtype
  return float(metrics['loss']), {k: before[k] - after[k] for k in before}


@pytest.fixture(scope='module')
def fp32_reference():
  batch = _caption_batch(4)
  return batch, _loss_and_grads(_caption()[1], batch)


def test_remat_gives_the_same_loss_and_gradients(fp32_reference):
  """model.vision.remat_layers (BLIP's vit_grad_ckpt) recomputes the last blocks in the backward
  pass and changes nothing else: the same loss and gradients within 1e-5."""
  batch, plain = fp32_reference
  remat = _loss_and_grads(_caption(vision={'remat_layers': 1})[1], batch)
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-5)
  for k in plain[1]:
    np.testing.assert_allclose(remat[1][k], plain[1][k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_bf16_compute_step_is_close_to_fp32(fp32_reference):
  """config.dtype='bfloat16' (bf16 compute, fp32 parameters): the loss within 2% of fp32, all
  gradients together within 3% and each tensor's within 5% (relative norms)."""
  batch, fp32 = fp32_reference
  bf16 = _loss_and_grads(_caption(dtype='bfloat16')[1], batch)
  np.testing.assert_allclose(bf16[0], fp32[0], rtol=2e-2)
  norm = lambda g: np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
  total = norm(fp32[1])
  assert norm({k: bf16[1][k] - fp32[1][k] for k in fp32[1]}) < 0.03 * total
  # Per tensor, except those whose gradient is zero up to rounding (attention key biases: the
  # softmax does not see them).
  errors = {k: np.linalg.norm(bf16[1][k] - fp32[1][k]) / np.linalg.norm(fp32[1][k]) for k in fp32[1]
            if np.linalg.norm(fp32[1][k]) > 1e-4 * total}
  assert len(errors) > 0.5 * len(fp32[1]) and max(errors.values()) < 0.05, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_train_step_uses_dropout_and_evaluation_does_not(fp32_reference):
  """MED's dropout 0.1 is on in the step (the originals train in model.train()): with lr 0 the
  parameters stay, yet the steps' losses are not the inference loss and change with each step's
  dropout masks; the model handed to evaluation is deterministic."""
  batch, (inference, _) = fp32_reference  # the same parameters (seed 0) without dropout
  task, config = _caption(0.1)
  trainer = _trainer(task, config, optim.optimizer(_optim(schedule='constant', lr=0.0, weight_decay=0.0), 1, 1))
  state, losses = trainer.init(), []
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.abs(np.asarray(losses) - inference).max() > 1e-3 and np.std(losses) > 1e-3, (losses, inference)
  _, params, rest = nnx.split(trainer.model(state), nnx.Param, ...)
  evaluated = jax.jit(lambda p, r: objectives.caption_loss(nnx.merge(nnx.graphdef(trainer.model(state)), p, r), batch,
                                                      None, 0.0, prompt_length=2)[0])
  np.testing.assert_allclose(float(evaluated(params, rest)), inference, rtol=1e-6)
