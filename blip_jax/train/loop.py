"""`train_and_evaluate(config, workdir)`: the whole run behind `train.py`.

data -> example tables -> sharded loaders -> Trainer (jitted step) -> checkpoints / logs /
evaluation. Resuming: when `workdir/checkpoints` holds a complete checkpoint the run continues
from it (parameters, optimiser, momentum encoders, queues, step, RNG and the data position), so
a killed run and a straight run see the same batches and reach the same state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from blip_jax import model_io
from blip_jax.data import datasets, examples as examples_lib
from blip_jax.data.loader import BatchLoader
from blip_jax.data.text import pre_caption
from blip_jax.data.transforms import image_function
from blip_jax.train import evaluation, optim, state as state_lib, tasks as tasks_lib
from blip_jax.train.logs import MetricWriter

log = logging.getLogger('blip_jax.train')


class TrainingDiverged(RuntimeError):
  pass


def _image_transform(task, train: bool) -> str:
  if train:
    return 'blip_train'
  return 'clip_eval' if task.family == 'clip' else 'blip_eval'


def _prepare_data(config, b, task, tokenizer, image_size, mesh):
  data = config.data
  records = examples_lib.read_text_fields(b, data.train_split)
  train_examples = examples_lib.build(task.kind, b.name, records, tokenizer, data, prompt=task.prompt)
  augment = dict(scale=(data.min_scale, 1.0), flip=data.flip, randaugment_ops=data.randaugment_ops)
  loader = BatchLoader(train_examples, examples_lib.data_source(b, data.train_split),
                       image_function('blip_train', image_size, **augment),
                       config.batch_size, seed=config.seed, sharding=state_lib.batch_sharding(mesh))
  eval_records = examples_lib.read_text_fields(b, data.eval_split)
  eval_source = examples_lib.data_source(b, data.eval_split)
  eval_image_fn = image_function(_image_transform(task, False), image_size)
  eval_batch = config.eval.batch_size
  common = dict(shuffle=False, drop_remainder=False, sharding=state_lib.batch_sharding(mesh))
  ev = evaluation.EvalData()
  if task.kind == 'pairs':
    ev.index = examples_lib.retrieval_index(b.name, eval_records, tokenizer, data.text_length)
    images = examples_lib.Examples(ev.index.image_records[:, None], ('image',), {})
    ev.images = BatchLoader(images, eval_source, eval_image_fn, eval_batch, **common)
  if task.kind != 'pairs' or task.name == 'blip2_stage2':
    eval_examples = examples_lib.build(task.kind, b.name, eval_records, tokenizer, data, prompt=task.prompt)
    ev.examples = BatchLoader(eval_examples, eval_source, eval_image_fn, eval_batch, **common)
  if task.kind == 'vqa':
    ev.answers = evaluation.vqa_answer_list(train_examples, tokenizer)
  zs = config.eval.zero_shot
  if zs.dataset:
    if task.name not in evaluation.ITC_TASKS:
      raise ValueError(f'eval.zero_shot needs ITC features; task {task.name} has none (use one of {evaluation.ITC_TASKS})')
    ev.zero_shot = _zero_shot_data(zs, data, tokenizer, eval_image_fn, eval_batch, common)
  return loader, ev


def _zero_shot_data(zs, data, tokenizer, image_fn, batch_size, common) -> evaluation.ZeroShotData:
  b = datasets.builder({'name': zs.dataset, 'data_dir': data.get('data_dir')})
  names = list(zs.class_names)
  if not names:
    label = b.info.features[zs.label_key] if zs.label_key in b.info.features else None
    if not hasattr(label, 'names'):
      raise ValueError(f'eval.zero_shot.class_names is needed: {b.name} feature {zs.label_key!r} has no class names')
    names = [n.replace('_', ' ') for n in label.names]
  bad = [t for t in zs.templates if '{}' not in t]
  if not zs.templates or bad:
    raise ValueError(f'eval.zero_shot.templates must each contain "{{}}" for the class name, got {list(zs.templates)}')
  prompts = [pre_caption(t.format(n)) for n in names for t in zs.templates]
  ids, mask = tokenizer.encode(prompts, data.text_length)
  examples = examples_lib.classification(b, zs.split, zs.image_key, zs.label_key, zs.first_label, len(names))
  images = BatchLoader(examples, examples_lib.data_source(b, zs.split), image_fn, batch_size, **common)
  return evaluation.ZeroShotData(images, examples.columns['label'], ids, mask, len(zs.templates))


def _model_config(config, task, tokenizer):
  if not config.init_from:
    return tasks_lib.model_config(task, config.model, tokenizer)
  meta = model_io.read_config(config.init_from)
  if meta['family'] != task.family:
    raise ValueError(f'init_from={config.init_from} holds a {meta["family"]} model; task {task.name} '
                     f'trains a {task.family} model')
  model_config = model_io.config_from_dict(model_io.CONFIG_CLASSES[meta['family']], meta['config'])
  if task.family == 'blip':  # the training state of this task, whatever the checkpoint was saved with
    model_config = dataclasses.replace(model_config, with_momentum=task.momentum,
                                       queue_size=config.model.get('queue_size', model_config.queue_size),
                                       prompt=task.prompt)
  return model_config


def _load_init(trainer, state, path):
  """Weights of a converted directory copied into the model by attribute path; momentum copies the
  checkpoint lacks start equal to their online encoders (the originals' copy_params)."""
  source, _ = model_io.load(path)
  model = trainer.model(state)
  have = model_io.unique_weights(source)
  loaded, unused = [], set(have)
  for name, var in model_io.unique_weights(model).items():
    if name in have and have[name].shape == var.shape:
      var.set_value(np.asarray(have[name].get_value(), var.dtype))  # a host value: the same on every host
      loaded.append(name)
      unused.discard(name)
  if getattr(model, 'momentum_pairs', None) and not any('_m.' in n for n in loaded):
    for online, momentum in model.momentum_pairs():
      nnx.update(momentum, nnx.state(online, nnx.Param))
  log.info('init_from %s: %d tensors loaded, %d not in the checkpoint, %d unused', path, len(loaded),
           len(model_io.unique_weights(model)) - len(loaded), len(unused))
  return trainer.with_model(state, model)


def _checkpoint_manager(workdir, keep):
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                               item_names=('state', 'data'))


def _restore(manager, trainer, step):
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          trainer.state_shapes, trainer.state_sharding)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def _save(manager, step, state, loader):
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(loader.state(step))))


def _alpha_fn(config, steps_per_epoch):
  ramp = config.get('alpha_ramp_epochs', 1) * steps_per_epoch
  alpha = config.get('alpha', 0.4)
  return lambda step: alpha * jnp.minimum(1.0, step / max(ramp, 1))


def _say(*args) -> None:
  """Print once per run: on the first process of a multi-host run."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def _format(metrics: dict[str, float]) -> str:
  return '  '.join(f'{k} {v:.2f}' for k, v in metrics.items())


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Train (or, with `config.eval_only`, evaluate) as `config` says; returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  task = tasks_lib.get(config.task)
  b = datasets.builder(config.data)
  tokenizer = datasets.tokenizer(config.data, b)
  model_config = _model_config(config, task, tokenizer)
  image_size = model_config.vision.image_size
  mesh = state_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the {mesh.size} devices of the mesh')
  if task.momentum and model_config.queue_size % config.batch_size:
    raise ValueError(f'model.queue_size {model_config.queue_size} must be a multiple of batch_size '
                     f'{config.batch_size} (the queue is written one global batch at a time)')
  loader, eval_data = _prepare_data(config, b, task, tokenizer, image_size, mesh)

  accum = config.optim.get('grad_accum', 1)
  steps_per_epoch = loader.steps_per_epoch
  num_steps = config.num_steps or config.num_epochs * steps_per_epoch
  num_epochs = -(-num_steps // steps_per_epoch)
  tx = optim.optimizer(config.optim, max(steps_per_epoch // accum, 1), num_epochs)
  lr_fn = optim.schedule(config.optim, max(steps_per_epoch // accum, 1), num_epochs)
  loss_kwargs = {}
  if task.prompt:
    prompt_ids, prompt_mask = tokenizer.encode([task.prompt], 32)
    loss_kwargs['prompt_length'] = int(prompt_mask.sum()) - 1  # [CLS] + prompt, without [SEP]
  trainer = state_lib.Trainer(task, lambda: tasks_lib.build_model(task, model_config, seed=config.seed), tx, mesh,
                              frozen=tuple(config.get('freeze', ())), alpha_fn=_alpha_fn(config, steps_per_epoch),
                              loss_kwargs=loss_kwargs, seed=config.seed,
                              fsdp_min_size=config.mesh.get('fsdp_min_size', state_lib.FSDP_MIN_SIZE))
  evaluator = evaluation.Evaluator(task, trainer, eval_data, tokenizer, config.eval)
  writer = MetricWriter(workdir)
  manager = _checkpoint_manager(workdir, config.get('keep_checkpoints', 2))

  start = manager.latest_step()
  if start is not None:
    state, data_state = _restore(manager, trainer, start)
    start = data_state['step']
    writer.rewind(start)
    log.info('resumed from %s at step %d', manager.directory, start)
  else:
    start = 0
    state = trainer.init()
    if config.init_from:
      state = _load_init(trainer, state, config.init_from)

  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  _say(f'{task.name}: {n_params / 1e6:.2f}M trained parameters, {len(loader.examples)} examples, '
        f'batch {config.batch_size} on {mesh.size} device(s) {dict(mesh.shape)}, '
        f'{num_steps} steps ({steps_per_epoch}/epoch)')

  if not config.eval_only and start < num_steps:
    state = _train(config, trainer, loader, state, start, num_steps, manager, writer, evaluator, lr_fn, accum)
  metrics = evaluator(state)
  if metrics:
    writer.write(num_steps, metrics)
    _say('eval:', _format(metrics))
  for text, refs in getattr(evaluator, 'samples', [])[:config.eval.get('show_captions', 5)]:
    _say(f'  generated: {text!r}\n      truth: {refs[0]!r}')
  if not config.eval_only:
    model_dir = os.path.join(workdir, 'model')
    model_io.save(model_dir, trainer.model(state), model_config,
                  task=task.model_task if task.family == 'blip' else task.name)
    if jax.process_index() == 0:
      shutil.copy(tokenizer.vocab_file, os.path.join(model_dir, 'vocab.txt'))  # what blip_jax.predict reads
  curve = writer.plot()
  if curve:
    _say(f'curves: {curve}\nmetrics: {writer.path}')
  return metrics


def _train(config, trainer, loader, state, start, num_steps, manager, writer, evaluator, lr_fn, accum):
  every_eval = config.get('eval_every_steps', 0)
  every_ckpt = config.get('checkpoint_every_steps', 0)
  every_log = config.get('log_every_steps', 10)
  bar = tqdm.tqdm(total=num_steps, initial=start, desc='train', dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  timed_from, timed_examples = None, 0
  window = []
  for step, batch in zip(range(start, num_steps), loader.iterate(start, num_steps - start)):
    state, metrics = trainer.step(state, batch)
    metrics = jax.device_get(metrics)
    if not metrics.pop('finite'):
      bad = [k for k, v in metrics.items() if not np.isfinite(v)]
      latest = manager.latest_step()
      manager.wait_until_finished()
      raise TrainingDiverged(
          f'step {step}: non-finite {", ".join(bad) or "loss"} '
          f'({", ".join(f"{k}={metrics[k]}" for k in bad)}); stopped before updating the model. '
          f'No checkpoint was written from this step; the last good one is '
          f'{"step " + str(latest) if latest is not None else "none"} in {manager.directory}.')
    if timed_from is None:
      timed_from = time.perf_counter()  # the first step compiles: speed is measured after it
    else:
      timed_examples += config.batch_size
    window.append(metrics)
    done = step + 1
    rate = timed_examples / max(time.perf_counter() - timed_from, 1e-9) if timed_examples else 0.0
    lr = float(lr_fn(jnp.asarray(step // accum)))  # the lr this step's (accumulated) update uses
    bar.set_postfix({k: f'{v:.3f}' for k, v in metrics.items() if k not in ('alpha', 'grad_norm')} |
                    {'lr': f'{lr:.2e}', 'ex/s': f'{rate:.1f}'}, refresh=False)
    bar.update(1)
    if done % every_log == 0 or done == num_steps:
      mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      window = []
      writer.write(done, {**{f'train/{k}': v for k, v in mean.items() if k not in ('grad_norm', 'alpha')},
                          'opt/lr': lr, 'opt/grad_norm': mean['grad_norm'], 'opt/alpha': mean['alpha'],
                          'speed/examples_per_s': rate})
    if every_ckpt and done % every_ckpt == 0 and done < num_steps:
      _save(manager, done, state, loader)
    if every_eval and done % every_eval == 0 and done < num_steps:
      metrics = evaluator(state)
      writer.write(done, metrics)
      bar.write(f'step {done} eval: {_format(metrics)}')
  bar.close()
  _save(manager, num_steps, state, loader)
  manager.wait_until_finished()
  return state
