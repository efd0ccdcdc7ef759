"""`train_and_evaluate(config, workdir)`: the whole run behind `train.py`.

data -> example tables -> sharded loaders -> Trainer (jitted step) -> checkpoints / logs /
evaluation. Resuming: the run continues from the newest checkpoint in `workdir/checkpoints` that
restores (`checkpoints.py`: parameters, optimiser, momentum encoders, queues, step, RNG and the
data position), so a killed run and a straight run see the same batches and reach the same state.
One run at a time holds the workdir (`lock.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from blip_jax import distributed, evaluate, model_io, registry
from blip_jax.data import datasets
from blip_jax.data import examples as examples_lib
from blip_jax.data.loader import BatchLoader
from blip_jax.data.transforms import image_function
from blip_jax.models.variables import unique_weights
from blip_jax.train import checkpoints, lock, objectives, optim
from blip_jax.train import state as state_lib
from blip_jax.train.logs import MetricWriter

log = logging.getLogger('blip_jax.train')


class TrainingDiverged(RuntimeError):
  pass


def model_config(config, objective: objectives.Objective, tokenizer):
  """The model config of the run: `config.model` (token fields from the tokenizer) or, with
  `init_from`, the checkpoint's own with the family's training fields (queue size, momentum)
  from `config.model`; then the objective's structural fields and `config.dtype`."""
  family = registry.get(objective.family)
  cfg = from_run = registry.with_tokenizer(
      registry.config_from_dict(family.config_cls, config.model.to_dict(), where='config.model'), tokenizer)
  if config.init_from:
    ckpt_family, _, cfg = model_io.model_config(config.init_from)
    if ckpt_family is not family:
      raise ValueError(f'init_from={config.init_from} holds a {ckpt_family.name} model; objective {objective.name} '
                       f'trains a {family.name} model')
    cfg = dataclasses.replace(cfg, **{k: getattr(from_run, k) for k in family.training_fields})
  cfg = dataclasses.replace(cfg, **objective.config_fields)
  return registry.with_dtype(cfg, config.dtype) if config.dtype else cfg


def _train_loader(config, b, objective, tokenizer, model_cfg, mesh) -> BatchLoader:
  data = config.data
  records = examples_lib.read_text_fields(b, data.train_split)
  prompt = model_cfg.prompt if objective.prompted else ''
  examples = examples_lib.build(objective.examples, b.name, records, tokenizer, data, prompt=prompt)
  augment = dict(scale=(data.min_scale, 1.0), flip=data.flip, randaugment_ops=data.randaugment_ops)
  return BatchLoader(examples, examples_lib.data_source(b, data.train_split),
                     image_function('blip_train', model_cfg.vision.image_size, **augment),
                     config.batch_size, seed=config.seed, sharding=state_lib.batch_sharding(mesh))


def _load_init(trainer, state, path):
  """Weights of a converted directory copied into the model by attribute path; momentum copies the
  checkpoint lacks start equal to their online encoders (the originals' copy_params)."""
  source, _ = model_io.load(path)
  model = trainer.model(state)
  have = unique_weights(source)
  loaded, unused = [], set(have)
  for name, var in unique_weights(model).items():
    if name in have and have[name].shape == var.shape:
      var.set_value(np.asarray(have[name].get_value(), var.dtype))  # a host value: the same on every host
      loaded.append(name)
      unused.discard(name)
  if getattr(model, 'momentum_pairs', None) and not any('_m.' in n for n in loaded):
    for online, momentum in model.momentum_pairs():
      nnx.update(momentum, nnx.state(online, nnx.Param))
  log.info('init_from %s: %d tensors loaded, %d not in the checkpoint, %d unused', path, len(loaded),
           len(unique_weights(model)) - len(loaded), len(unused))
  return trainer.with_model(state, model)


def _diverged(step, metrics, manager) -> TrainingDiverged:
  bad = [k for k, v in metrics.items() if not np.isfinite(v)]
  latest = manager.latest_step()
  return TrainingDiverged(
      f'step {step}: non-finite {", ".join(bad) or "loss"} '
      f'({", ".join(f"{k}={metrics[k]}" for k in bad)}); stopped before updating the model. '
      f'No checkpoint was written from this step; the last good one is '
      f'{"step " + str(latest) if latest is not None else "none"} in {manager.directory}.')


def _alpha_fn(config, steps_per_epoch):
  ramp, alpha = config.alpha_ramp_epochs * steps_per_epoch, config.alpha
  return lambda step: alpha * jnp.minimum(1.0, step / max(ramp, 1))


def _say(*args) -> None:
  """Print once per run: on the first process of a multi-host run."""
  if distributed.is_primary():
    print(*args, flush=True)


def _format(metrics: dict[str, float]) -> str:
  return '  '.join(f'{k} {v:.2f}' for k, v in metrics.items())


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Train (or, with `config.eval_only`, evaluate) as `config` says; returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  with lock.hold(workdir):
    return _run(config, workdir)


def _run(config, workdir):
  objective = objectives.get(config.objective)
  family = registry.get(objective.family)
  b = datasets.builder(config.data)
  tokenizer = datasets.tokenizer(config.data, b, with_enc=family.with_enc)
  model_cfg = model_config(config, objective, tokenizer)
  mesh = state_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the {mesh.size} devices of the mesh')
  if objective.momentum and model_cfg.queue_size % config.batch_size:
    raise ValueError(f'model.queue_size {model_cfg.queue_size} must be a multiple of batch_size '
                     f'{config.batch_size} (the queue is written one global batch at a time)')
  loader = _train_loader(config, b, objective, tokenizer, model_cfg, mesh)

  accum = config.optim.grad_accum
  steps_per_epoch = loader.steps_per_epoch
  num_steps = config.num_steps or config.num_epochs * steps_per_epoch
  num_epochs = -(-num_steps // steps_per_epoch)
  tx = optim.optimizer(config.optim, max(steps_per_epoch // accum, 1), num_epochs)
  lr_fn = optim.schedule(config.optim, max(steps_per_epoch // accum, 1), num_epochs)
  loss_kwargs = {}
  if objective.prompted:
    _, prompt_mask = tokenizer.encode([model_cfg.prompt], 32)
    loss_kwargs['prompt_length'] = int(prompt_mask.sum()) - 1  # [CLS] + prompt, without [SEP]
  build_model = lambda: family.build(objective.task, model_cfg, seed=config.seed)
  trainer = state_lib.Trainer(objective, build_model, tx, mesh, frozen=tuple(config.freeze),
                              alpha_fn=_alpha_fn(config, steps_per_epoch), loss_kwargs=loss_kwargs, seed=config.seed,
                              fsdp_min_size=config.mesh.fsdp_min_size)
  ctx = evaluate.EvalContext(b, config.data, tokenizer, model_cfg.vision.image_size, family.image_transform,
                             state_lib.batch_sharding(mesh), trainer.model, nnx.eval_shape(build_model),
                             prompt=getattr(model_cfg, 'prompt', ''), train_examples=loader.examples)
  evaluators = evaluate.build(config.evals, ctx)
  writer = MetricWriter(workdir)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          trainer.state_shapes, trainer.state_sharding)
  manager, state, data_state = checkpoints.restore_latest(workdir, config.keep_checkpoints, abstract)
  if state is not None:
    start = data_state['step']
    log.info('resumed from %s at step %d', manager.directory, start)
  else:
    start = 0
    state = trainer.init()
    if config.init_from:
      state = _load_init(trainer, state, config.init_from)
  if not config.eval_only:
    writer.rewind(start)  # rows a killed run wrote after its last checkpoint (or before its first)

  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  _say(f'{objective.name}: {n_params / 1e6:.2f}M trained parameters, {len(loader.examples)} examples, '
       f'batch {config.batch_size} on {mesh.size} device(s) {dict(mesh.shape)}, '
       f'{num_steps} steps ({steps_per_epoch}/epoch)')

  if not config.eval_only and start < num_steps:
    state = _train(config, trainer, loader, state, start, num_steps, manager, writer, evaluators, lr_fn, accum)
  metrics = evaluate.run(evaluators, state)
  if metrics:
    writer.forget(num_steps, metrics)  # a rerun of a finished run, or an eval_only run
    writer.write(num_steps, metrics)
    _say('eval:', _format(metrics))
  for evaluator in evaluators.values():
    for text, refs in getattr(evaluator, 'samples', []):
      _say(f'  generated: {text!r}\n      truth: {refs[0]!r}')
  if not config.eval_only:
    model_dir = os.path.join(workdir, 'model')
    model_io.save(model_dir, trainer.model(state), model_cfg, task=objective.task, tokenizer=tokenizer)
  curve = writer.plot()
  if curve:
    _say(f'curves: {curve}\nmetrics: {writer.path}')
  return metrics


AHEAD = 2  # steps queued behind the one the device runs: it never idles, and the batches held stay few


def _train(config, trainer, loader, state, start, num_steps, manager, writer, evaluators, lr_fn, accum):
  """The step loop. The host waits for no step but the one `AHEAD` steps back: metrics stay on
  the device and are fetched, in one transfer, only where the host needs them (log, checkpoint and
  eval steps, and the end); a divergence found there stops the run at the step that diverged,
  whose state the steps after it leave unchanged (`Trainer._step`)."""
  every_eval, every_ckpt, every_log = config.eval_every_steps, config.checkpoint_every_steps, config.log_every_steps
  bar = tqdm.tqdm(total=num_steps, initial=start, desc='train', dynamic_ncols=True,
                  disable=not distributed.is_primary())
  timed_from, timed_examples = None, 0
  pending, window = [], []  # (step, metrics on the device) not yet fetched; fetched metrics not yet logged

  def fetch():
    for (step, _), metrics in zip(pending, jax.device_get([m for _, m in pending])):
      finite, applied = metrics.pop('finite'), metrics.pop('applied')
      if not finite:
        checkpoints.finish(manager)
        raise _diverged(step, metrics, manager)
      if not applied:  # the loop and the state disagree on the step number: a bug, never silence
        raise RuntimeError(f'step {step}: the train state is at another step; the update was not applied')
      window.append(metrics)
    pending.clear()

  for step, batch in zip(range(start, num_steps), loader.iterate(start, num_steps - start)):
    state, metrics = trainer.step(state, batch, step)
    pending.append((step, metrics))
    if len(pending) > AHEAD:  # at most AHEAD steps (and their batches) queued on the device
      pending[-AHEAD - 1][1]['finite'].block_until_ready()
    if timed_from is None:
      timed_from = time.perf_counter()  # the first step compiles: speed is measured after it
    else:
      timed_examples += config.batch_size
    done = step + 1
    bar.update(1)
    log_now = done % every_log == 0 or done == num_steps
    save_now = every_ckpt and done % every_ckpt == 0 and done < num_steps
    eval_now = every_eval and done % every_eval == 0 and done < num_steps
    if log_now or save_now or eval_now:
      fetch()
    if log_now:
      rate = timed_examples / max(time.perf_counter() - timed_from, 1e-9) if timed_examples else 0.0
      lr = float(lr_fn(jnp.asarray(step // accum)))  # the lr this step's (accumulated) update used
      mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      window.clear()
      bar.set_postfix({k: f'{v:.3f}' for k, v in mean.items() if k not in ('alpha', 'grad_norm')} |
                      {'lr': f'{lr:.2e}', 'ex/s': f'{rate:.1f}'})
      writer.write(done, {**{f'train/{k}': v for k, v in mean.items() if k not in ('grad_norm', 'alpha')},
                          'opt/lr': lr, 'opt/grad_norm': mean['grad_norm'], 'opt/alpha': mean['alpha'],
                          'speed/examples_per_s': rate})
    if save_now:
      checkpoints.save(manager, done, state, loader.state(done))
    if eval_now:
      metrics = evaluate.run(evaluators, state)
      writer.write(done, metrics)
      bar.write(f'step {done} eval: {_format(metrics)}')
  fetch()
  bar.close()
  checkpoints.save(manager, num_steps, state, loader.state(num_steps))
  checkpoints.finish(manager)
  return state
