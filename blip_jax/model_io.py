"""Converted-model directories: `config.json` + an orbax checkpoint of the weights.

    model, config = blip_jax.load('converted/blip_caption_base')   # a directory written here
    model, config = blip_jax.load('model_base_caption.pth', task='caption')  # converts in memory

A directory holds `config.json` (format, family, task, model config, weight dtype, provenance:
source files and their sha256, layout, skipped / missing / resized keys) and `weights/`, an
orbax checkpoint of a flat {attribute path: array} dict. Weights are restored into a model
built with `nnx.eval_shape`, so loading never initialises (and never holds) a second copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import typing
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax.convert.tree import build_abstract, named_variables
from blip_jax.models import blip, blip2, clip, opt

FORMAT = 'blip_jax/1'
CONFIG_FILE = 'config.json'
WEIGHTS_DIR = 'weights'


def family_of(config) -> str:
  if isinstance(config, blip.BlipConfig):
    return 'blip'
  if isinstance(config, blip2.Blip2Config):
    return 'blip2'
  if isinstance(config, opt.OPTConfig):
    return 'opt'
  if isinstance(config, clip.ChineseCLIPConfig):
    return 'chinese_clip'
  if isinstance(config, clip.CLIPConfig):
    return 'clip'
  raise TypeError(f'unknown model config type {type(config).__name__}')


CONFIG_CLASSES = {'blip': blip.BlipConfig, 'blip2': blip2.Blip2Config, 'opt': opt.OPTConfig,
                  'clip': clip.CLIPConfig,
                  'chinese_clip': clip.ChineseCLIPConfig}


def config_from_dict(cls, values: dict[str, Any]):
  """Rebuild a (nested) config dataclass from `dataclasses.asdict` output."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - names
  if unknown:
    raise ValueError(f'unknown {cls.__name__} fields in {CONFIG_FILE}: {sorted(unknown)}')
  kwargs = {}
  for name, value in values.items():
    if isinstance(value, dict):  # a nested config, possibly Optional
      nested = [t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)]
      if nested:
        value = config_from_dict(nested[0], value)
    kwargs[name] = value
  return cls(**kwargs)


def build(family: str, task: str, config, *, seed: int = 0) -> nnx.Module:
  if family == 'blip':
    return blip.build(task, config, seed=seed)
  if family == 'blip2':
    return blip2.build(config, seed=seed)
  if family == 'opt':
    return opt.build(config, seed=seed)
  return clip.build(config, seed=seed)


def unique_weights(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{dotted path: Variable} of the model's weights, a shared Variable under its first path in
  sorted order (the order of a split / merged or abstract model too, so the names of tied
  weights do not depend on how the model was made)."""
  out, seen = {}, set()
  for path, var in sorted(named_variables(model), key=lambda item: item[0]):
    if id(var) not in seen:
      seen.add(id(var))
      out[path] = var
  return out


def sha256(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def is_model_dir(path) -> bool:
  if not isinstance(path, (str, os.PathLike)):
    return False
  config = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    try:
      return json.load(f).get('format') == FORMAT
    except json.JSONDecodeError:
      return False


def save(out_dir, model: nnx.Module, config, *, task: str, dtype: str = 'float32',
         provenance: dict[str, Any] | None = None) -> None:
  """Write `model`'s weights (cast to `dtype`) and its config to `out_dir` (replaced)."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(os.fspath(out_dir))
  weights = {path: jnp.asarray(var.get_value()).astype(dtype) if jnp.issubdtype(var.dtype, jnp.floating)
             else jnp.asarray(var.get_value()) for path, var in unique_weights(model).items()}
  # With several processes (a multi-host run) every one writes its shards of the weights; the
  # first alone clears the directory and writes the config.
  primary = jax.process_index() == 0
  if primary:
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.makedirs(out_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'model_io.save: {out_dir} cleared')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, WEIGHTS_DIR), weights)
  checkpointer.wait_until_finished()
  if primary:
    meta = {'format': FORMAT, 'family': family_of(config), 'task': task, 'dtype': dtype,
            'config': dataclasses.asdict(config), 'provenance': provenance or {}}
    with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
      json.dump(meta, f, indent=2)


def read_config(model_dir) -> dict[str, Any]:
  with open(os.path.join(os.fspath(model_dir), CONFIG_FILE)) as f:
    return json.load(f)


def load(source, *, seed: int = 0, **convert_kwargs):
  """Load a converted directory, or convert a PyTorch checkpoint in memory.

  Returns (model, config). `convert_kwargs` go to `blip_jax.convert.load_torch` when `source`
  is not a converted directory (task, image_size, act, vision={...}, ...).
  """
  if not is_model_dir(source):
    from blip_jax.convert import load_torch
    model, config, _ = load_torch(source, seed=seed, **convert_kwargs)
    return model, config
  if convert_kwargs:
    raise ValueError(f'{source} is already converted; options {sorted(convert_kwargs)} apply to '
                     'PyTorch checkpoints only')
  import orbax.checkpoint as ocp
  meta = read_config(source)
  family = meta['family']
  config = config_from_dict(CONFIG_CLASSES[family], meta['config'])
  model = build_abstract(lambda: build(family, meta['task'], config, seed=seed))
  variables = unique_weights(model)
  # Onto this process's first device, whatever devices the weights were saved from (a model
  # trained on many devices or hosts loads on one CPU).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {path: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=device) for path, var in variables.items()}
  weights_dir = os.path.join(os.path.abspath(os.fspath(source)), WEIGHTS_DIR)
  try:
    restored = ocp.StandardCheckpointer().restore(weights_dir, target)
  except Exception as e:  # noqa: BLE001 - orbax reports mismatches in many ways
    raise ValueError(f'{weights_dir}: the weights do not match the model in {CONFIG_FILE}: {e}') from e
  for path, var in variables.items():
    var.set_value(restored.pop(path))
  return model, config


def provenance(ckpt, report) -> dict[str, Any]:
  """What a conversion read and did, for config.json."""
  return {
      'sources': [{'path': os.path.abspath(f), 'sha256': sha256(f)} for f in ckpt.files
                  if os.path.isfile(f)],
      'layout': report.layout,
      'converted': len(report.converted),
      'skipped': report.skipped,
      'missing': report.missing,
      'resized': report.resized,
  }


__all__ = ['load', 'save', 'is_model_dir', 'read_config', 'FORMAT']
