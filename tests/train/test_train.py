"""Training: the objectives' equations, every config at tiny size, resume, NaN stop, frozen weights."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import blip_jax
from blip_jax import evaluate, losses, registry
from blip_jax.data import datasets
from blip_jax.data import examples as ex
from blip_jax.data.loader import BatchLoader
from blip_jax.data.transforms import image_function
from blip_jax.models.variables import unique_weights
from blip_jax.testing import tiny
from blip_jax.train import loop, objectives
from blip_jax.train import state as state_lib

ROOT = pathlib.Path(__file__).parents[2]
# pretrain_capfilt trains on a capfilt output, which tests/test_capfilt.py makes and trains on.
CONFIGS = sorted(p.stem for p in (ROOT / 'blip_jax' / 'configs').glob('*.py')
                 if p.stem not in ('pretrain_capfilt', '__init__'))


@pytest.fixture
def data_dir(scenes_dir):
  return scenes_dir


def _tiny(name, data_dir, **overrides):
  c = tiny.config(name)
  c.data.data_dir = data_dir
  c.update(overrides)
  return c


def _train_lines(workdir):
  lines = [json.loads(l) for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [l for l in lines if 'train/loss' in l]


# ------------------------------------------------------------------------- the equations


def test_momentum_update_and_queue_enqueue_follow_the_reference_equations():
  _, _, model = tiny.build('retrieval')
  # Make the momentum copies differ from the online encoders first.
  nnx.update(model.vision_proj_m, jax.tree.map(lambda x: x + 1.0, nnx.state(model.vision_proj_m, nnx.Param)))
  online = np.asarray(model.vision_proj.kernel[...])
  before = np.asarray(model.vision_proj_m.kernel[...])
  model.update_momentum()
  np.testing.assert_allclose(model.vision_proj_m.kernel[...], 0.995 * before + 0.005 * online, rtol=1e-6)

  size = model.config.queue_size
  ptr = size - 8  # the pointer wraps to 0 after this batch of 8
  model.ptr_queue[...] = jnp.asarray([ptr], jnp.int32)
  rng = np.random.default_rng(0)
  image_feat, text_feat = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(2))
  ids = jnp.arange(8, dtype=jnp.int32) + 100
  old = np.asarray(model.image_queue[...])
  objectives._enqueue(model, image_feat, text_feat, ids)
  np.testing.assert_array_equal(model.image_queue[...][:, ptr:], np.asarray(image_feat).T)
  np.testing.assert_array_equal(model.text_queue[...][:, ptr:], np.asarray(text_feat).T)
  np.testing.assert_array_equal(model.idx_queue[...][0, ptr:], np.asarray(ids))
  np.testing.assert_array_equal(model.image_queue[...][:, :ptr], old[:, :ptr])
  assert int(model.ptr_queue[...][0]) == 0
  # Slots filled so far: the batch's 8 (from a fresh queue), at most the queue size.
  assert int(model.queue_filled[...][0]) == 8
  model.queue_filled[...] = jnp.asarray([size - 4], jnp.int32)
  objectives._enqueue(model, image_feat, text_feat, ids)
  assert int(model.queue_filled[...][0]) == size


def test_itc_targets_with_same_id_positives_and_distillation():
  """The retrieval ITC loss equals the reference formula written out in numpy."""
  _, _, model = tiny.build('retrieval')
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(4, 60, (4, 10)), jnp.int32)
  mask = jnp.ones_like(ids)
  image_ids = jnp.asarray([7, 7, 3, 5], jnp.int32)
  queue = {k: np.array(getattr(model, k)[...]) for k in ('image_queue', 'text_queue', 'idx_queue')}
  queue['idx_queue'][0, :3] = [3, 9, 7]  # queue entries that share ids with the batch
  model.idx_queue[...] = jnp.asarray(queue['idx_queue'])
  filled = model.config.queue_size - 5  # the last 5 slots still hold their random initial values
  model.queue_filled[...] = jnp.asarray([filled], jnp.int32)
  alpha = 0.4
  loss, image_feat, text_feat = objectives.itc_with_momentum(model, images, model.image_embeds(images), ids, mask,
                                                        alpha, image_ids)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  feat_m_i = l2(np.asarray(model.vision_proj_m(model.visual_encoder_m(images)[:, 0])))
  feat_m_t = l2(np.asarray(model.text_proj_m(model.text_encoder_m(ids, mask, mode='text')[:, 0])))
  # Slots never written are no negatives: the reference leaves them out.
  image_all = np.concatenate([feat_m_i, queue['image_queue'][:, :filled].T])
  text_all = np.concatenate([feat_m_t, queue['text_queue'][:, :filled].T])
  ids_all = np.concatenate([np.asarray(image_ids), queue['idx_queue'][0, :filled]])
  pos = (np.asarray(image_ids)[:, None] == ids_all[None]).astype(np.float64)
  pos /= pos.sum(1, keepdims=True)
  temp = float(model.temp[...])
  softmax = lambda x: np.exp(x - x.max(1, keepdims=True)) / np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)
  log_softmax = lambda x: np.log(softmax(x))
  t_i2t = alpha * softmax(feat_m_i @ text_all.T / temp) + (1 - alpha) * pos
  t_t2i = alpha * softmax(feat_m_t @ image_all.T / temp) + (1 - alpha) * pos
  i2t = -(log_softmax(np.asarray(image_feat) @ text_all.T / temp) * t_i2t).sum(1).mean()
  t2i = -(log_softmax(np.asarray(text_feat) @ image_all.T / temp) * t_t2i).sum(1).mean()
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-5)


def test_hard_negatives_never_pick_a_same_id_pair():
  image_ids = jnp.asarray([0, 0, 1, 2, 2, 2, 3, 4])
  pos = losses.positives(8, image_ids)
  # Similarities that strongly favour the positives: sampling must still avoid them.
  sim = jnp.where(pos, 50.0, 0.0) + jax.random.normal(jax.random.key(0), (8, 8))
  for seed in range(200):
    neg_image, neg_text = losses.sample_hard_negatives(jax.random.key(seed), sim, sim.T, pos)
    assert (image_ids[neg_image] != image_ids).all() and (image_ids[neg_text] != image_ids).all()


# ---------------------------------------------------------------------- configs and runs


# From scratch at tiny size, NLVR2 needs more than 30 steps to move, and BLIP-2 stage 2 learns
# only the soft prompt of a random frozen LLM: their decrease is checked on a repeated batch below.
SLOW_STARTERS = ('nlvr', 'blip2_stage2')


# The configs whose runs also check zero-shot classification (models with contrastive features)
# and frozen weights (BLIP-2's image encoder and LLM).
ZERO_SHOT = ('clip', 'retrieval', 'blip2_stage1')
FROZEN = {'blip2_stage1': ('visual_encoder.',), 'blip2_stage2': ('visual_encoder.', 'opt_model.')}


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_trains_at_tiny_size_and_its_loss_decreases(name, data_dir, tmp_path):
  config = _tiny(name, data_dir, num_steps=30)
  if name in ZERO_SHOT:
    config.evals.zero_shot = evaluate.settings(
        'zero_shot', dataset=config.data.name, label_key='num_objects', first_label=1,
        class_names=('one shape', 'two shapes', 'three shapes'), templates=('an image showing {}', 'a picture of {}'))
  metrics = loop.train_and_evaluate(config, str(tmp_path))
  lines = _train_lines(tmp_path)
  assert [l['step'] for l in lines] == list(range(1, 31))
  # With momentum encoders, from the step the feature queues are full (queue_size / batch_size
  # steps): until then ITC has fewer negatives, so a lower loss that says nothing about learning.
  # The alpha ramp also raises ITC's floor (the entropy of its soft targets) during these steps,
  # so any decrease is the test there.
  momentum = objectives.get(config.objective).momentum
  full = config.model.queue_size // config.batch_size if momentum else 0
  first, last = (np.mean([l['train/loss'] for l in part]) for part in (lines[full:full + 5], lines[-5:]))
  assert np.isfinite([first, last]).all()
  if config.objective not in SLOW_STARTERS:
    assert last < (1.0 if momentum else 0.95) * first, (name, first, last)
  expected = {'retrieval': 'retrieval/i2t_r1', 'pretrain': 'caption/cider', 'caption': 'caption/bleu4',
              'vqa': 'vqa/accuracy', 'nlvr': 'nlvr/accuracy', 'blip2_stage1': 'retrieval/t2i_r1',
              'blip2_stage2': 'lm/loss', 'clip': 'retrieval/r_mean'}[config.objective]
  assert expected in metrics and np.isfinite(metrics[expected])
  model, model_cfg = blip_jax.load(tmp_path / 'model')  # the exported model loads
  assert (tmp_path / 'training_curves.png').stat().st_size > 0
  if name in ZERO_SHOT:
    _zero_shot_equals_classifying_each_image_by_hand(config, metrics, model)
  if name in FROZEN:
    _frozen_weights_never_changed(config, tmp_path, model, model_cfg, FROZEN[name])


def _zero_shot_equals_classifying_each_image_by_hand(config, metrics, model):
  """`zero_shot/top1` equals classifying every validation scene by its number of objects one image
  at a time: CLIP with blip_jax.zero_shot (checked against open_clip), BLIP / BLIP-2 by the cosine
  of the ITC features with each class's averaged normalised prompt features."""
  assert 'zero_shot/top5' not in metrics  # 3 classes: top-5 says nothing
  family = registry.family_of(model.config)
  tok = datasets.tokenizer(config.data, datasets.builder(config.data), with_enc=family.with_enc)
  zs = config.evals.zero_shot
  prompts = [t.format(c) for c in zs.class_names for t in zs.templates]
  ids, mask = (x.reshape(3, 2, -1) for x in tok.encode(prompts, config.data.text_length))
  source = datasets.builder(config.data).as_data_source('validation')
  transform = image_function(family.image_transform, model.config.vision.image_size)
  hits = []
  if family.name == 'clip':
    from blip_jax import zero_shot
    classifier = zero_shot.zero_shot_classifier(model, ids, mask)
  else:
    text = lambda i, m: (model.text_features(model.text_embeds(i, m)) if family.name == 'blip'
                         else model.text_features(i, m))
    feats = [[np.asarray(text(ids[c, t][None], mask[c, t][None]))[0] for t in range(2)] for c in range(3)]
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    classes = norm(np.stack([np.mean([norm(f) for f in per_class], 0) for per_class in feats]))
  for record in source:
    image = transform(record['image'], np.zeros(2, np.int64))[None]
    if family.name == 'clip':
      predicted = int(zero_shot.classify(model, image, classifier, k=1)[0][0, 0])
    else:
      image_feat = np.asarray(model.image_features(model.image_embeds(image)))[0]  # [E] or [queries, E]
      predicted = int(np.argmax((norm(image_feat) @ classes.T).reshape(-1, 3).max(0)))
    hits.append(predicted == record['num_objects'] - 1)
  assert len(hits) >= 8
  np.testing.assert_allclose(metrics['zero_shot/top1'], 100 * np.mean(hits), atol=1e-9)


def _frozen_weights_never_changed(config, workdir, model, model_cfg, frozen):
  """BLIP-2's frozen parts are outside the optimiser (not in the checkpoint's `params`) and end the
  run exactly as initialised, while the Q-Former and projections trained."""
  objective = objectives.get(config.objective)
  state = ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(config.num_steps) / 'state').absolute())
  params = [state_lib.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state['params'])]
  assert params and not any(n.startswith(frozen) for n in params)
  initial = unique_weights(registry.build('blip2', objective.task, model_cfg, seed=config.seed))
  final = unique_weights(model)
  kept = [n for n in final if n.startswith(frozen)]
  assert kept and all(np.array_equal(final[n].get_value(), initial[n].get_value()) for n in kept)
  trained = [n for n in final if not n.startswith(frozen)]
  changed = [not np.array_equal(final[n].get_value(), initial[n].get_value()) for n in trained]
  assert np.mean(changed) > 0.9  # the Q-Former (and projections) did train


def _trainer_and_batch(name, data_dir):
  """The tiny `name` config's trainer (AdamW 1e-3, one device) and its first training batch."""
  config = _tiny(name, data_dir)
  objective = objectives.get(name)
  family = registry.get(objective.family)
  builder = datasets.builder(config.data)
  tok = datasets.tokenizer(config.data, builder, with_enc=family.with_enc)
  table = ex.build(objective.examples, builder.name, ex.read_text_fields(builder, 'train'), tok, config.data)
  batch = BatchLoader(table, builder.as_data_source('train'), image_function('blip_eval', 32), 8).load(0)
  batch.pop('valid')
  model_config = loop.model_config(config, objective, tok)
  trainer = state_lib.Trainer(objective, lambda: family.build(objective.task, model_config), optax.adamw(1e-3),
                              state_lib.make_mesh())
  return trainer, batch


@pytest.mark.parametrize('name', SLOW_STARTERS)
def test_slow_starters_fit_a_repeated_synthetic_scenes_batch(name, data_dir):
  trainer, batch = _trainer_and_batch(name, data_dir)
  state, losses = trainer.init(), []
  for _ in range(30):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < (0.9 if name == 'nlvr' else 1.0) * first, (name, first, last)


def test_the_steps_after_a_non_finite_one_leave_the_state_as_it_was(data_dir):
  """What lets the loop read the metrics only at its log steps (`Trainer._step`'s `index`)."""
  trainer, batch = _trainer_and_batch('caption', data_dir)
  state = trainer.init()
  state, good = trainer.step(state, batch, 0)
  before = jax.device_get(state)
  poisoned = {**batch, 'image': np.full_like(batch['image'], np.nan)}
  state, bad = trainer.step(state, poisoned, 1)
  state, after = trainer.step(state, batch, 2)  # a good batch, but the state is still at step 1
  assert bool(good['applied']) and not bool(bad['finite']) and bool(after['finite']) and not bool(after['applied'])
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  state, again = trainer.step(state, batch, 1)  # at the state's own step it applies again
  assert bool(again['applied']) and int(state['step']) == 2


def _train_py(workdir, config, *overrides):
  """train.py in a subprocess; its output goes to a file (a pipe nobody reads would fill and stall it)."""
  workdir.mkdir(parents=True, exist_ok=True)
  log = open(workdir.with_name(workdir.name + '.log'), 'a')  # noqa: SIM115 - handed to the child process
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / 'train.py'), '--config', config, '--workdir', str(workdir),
       *overrides], stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log = pathlib.Path(log.name)
  log.close()
  return proc


def _finished(proc):
  proc.wait(timeout=900)
  output = proc.log.read_text()
  assert proc.returncode == 0, output[-3000:]
  return output


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit())


def test_train_py_killed_then_resumed_equals_a_straight_run(data_dir, tmp_path):
  """`train.py` on the tiny retrieval recipe (momentum encoders, queues, the alpha ramp) is
  SIGKILLed at a random moment after its first checkpoint, started again with the same command,
  and ends where a straight run ends: every metrics.jsonl row (the rows written after the
  checkpoint and before the kill are dropped on resume) and the final state within 1e-6. The lr
  schedule crosses an epoch during its warmup (10 steps per epoch, warmup 12 steps): the logged
  lr follows BLIP's rule, the warmup ends with epoch 0."""
  num_steps, spe = 14, 10
  args = [f'--config.data.data_dir={data_dir}', f'--config.num_steps={num_steps}', '--config.checkpoint_every_steps=2',
          '--config.keep_checkpoints=10', '--config.optim.schedule=step', '--config.optim.warmup_steps=12',
          '--config.optim.warmup_lr=1e-4', '--config.optim.decay_rate=0.5']
  datasets.builder(_tiny('retrieval', data_dir).data)  # built once, before two processes read it
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  procs = [_train_py(straight, 'retrieval:tiny', *args), _train_py(killed, 'retrieval:tiny', *args)]
  delay = np.random.default_rng().uniform(0, 1.0)
  deadline = time.time() + 600
  while not (killed / 'checkpoints').exists() or not _steps(killed):
    assert procs[1].poll() is None and time.time() < deadline, procs[1].log.read_text()[-3000:]
    time.sleep(0.02)
  time.sleep(delay)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  at_kill = _steps(killed)
  assert procs[1].returncode == -signal.SIGKILL and num_steps not in at_kill, (delay, at_kill)
  output = _finished(_train_py(killed, 'retrieval:tiny', *args))
  resumed = max(at_kill)
  assert f'at step {resumed}' in output, output[-2000:]
  _finished(procs[0])

  rows = {name: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
          for name, d in (('straight', straight), ('killed', killed))}
  assert [r['step'] for r in rows['killed']] == [r['step'] for r in rows['straight']] == [*range(1, num_steps + 1), num_steps]
  for a, b in zip(rows['straight'], rows['killed']):
    keys = sorted(k for k in a if not k.startswith('speed/'))
    assert keys == sorted(k for k in b if not k.startswith('speed/'))
    np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-6, atol=1e-6, err_msg=str(keys))
  # BLIP pretrain.py: warmup_lr_schedule(i) in epoch 0 only, then init_lr * decay_rate ** epoch.
  expected = [min(1e-3, 1e-4 + (1e-3 - 1e-4) * i / 12) if i < spe else 1e-3 * 0.5 ** (i // spe) for i in range(num_steps)]
  np.testing.assert_allclose([r['opt/lr'] for r in rows['straight'][:num_steps]], expected, rtol=1e-6)

  restore = lambda d: ocp.StandardCheckpointer().restore((d / 'checkpoints' / str(num_steps) / 'state').absolute())
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(restore(straight)), jax.tree.leaves(restore(killed))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_nan_in_the_batch_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  """Logging every 3 steps, the loop reads the metrics of step 4 only after step 5 ran (which left
  the state as step 4 did: unchanged), and the run still names step 4."""
  load = BatchLoader.load

  def poisoned(self, step):
    batch = load(self, step)
    if step == 4 and 'image' in batch and self.shuffle:
      batch['image'][:] = np.nan
    return batch

  monkeypatch.setattr(BatchLoader, 'load', poisoned)
  config = _tiny('default', data_dir, num_steps=8, checkpoint_every_steps=2, keep_checkpoints=5, log_every_steps=3)
  with pytest.raises(loop.TrainingDiverged, match=r'step 4: non-finite .*loss.* last good one is step 4'):
    loop.train_and_evaluate(config, str(tmp_path))
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  assert manager.all_steps() == [2, 4]
  state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '4' / 'state')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  assert not (tmp_path / 'model').exists()
