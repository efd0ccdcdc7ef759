"""Converted-model directories: `config.json` + an orbax checkpoint of the weights + the
tokenizer's files.

    model_io.save('converted/blip_caption_base', model, config, task='caption', tokenizer=tok)
    model, config = model_io.load('converted/blip_caption_base')

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax import distributed, registry, storage
from blip_jax.models.variables import build_abstract, nonfinite_error, unique_weights

# 2: tasks named by the family's model classes (BLIP-2 stage1 / stage2, CLIP contrastive, OPT lm).
FORMAT = 'blip_jax/2'
CONFIG_FILE = 'config.json'
WEIGHTS_DIR = 'weights'
PARTIAL_SUFFIX = '.incomplete'  # a directory being written (see save)


def sha256(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def is_model_dir(path) -> bool:
  """Whether `path` is a directory written by `save` (of this format or an older one)."""
  if not isinstance(path, (str, os.PathLike)):
    return False
  config = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    try:
      return str(json.load(f).get('format', '')).startswith('blip_jax/')
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
      # A damaged config.json beside our weights/ is still ours (read_config then says what is wrong).
      return os.path.isdir(os.path.join(os.fspath(path), WEIGHTS_DIR))


def save(out_dir, model: nnx.Module, config, *, task: str, dtype: str = 'float32',
         provenance: dict[str, Any] | None = None, tokenizer=None, tokenizer_source: str = '') -> None:
  """Write `model`'s weights (cast to `dtype`), its config and its tokenizer's files to `out_dir`
  (replaced once the new one is complete; a full or read-only disk is a `storage.OutputError`).
  Without a tokenizer, `tokenizer_source` may name where one is found (a Hub id such as
  'bert-base-uncased'), so that loading needs no extra argument."""
  import orbax.checkpoint as ocp
  family = registry.family_of(config)
  if task not in family.tasks:
    raise ValueError(f'task {task!r} is not one of the {family.name} tasks {sorted(family.tasks)}')
  out_dir = os.path.abspath(os.fspath(out_dir))
  weights = {path: jnp.asarray(var.get_value()).astype(dtype) if jnp.issubdtype(var.dtype, jnp.floating)
             else jnp.asarray(var.get_value()) for path, var in unique_weights(model).items()}
  needed = sum(w.nbytes for w in weights.values())
  # Written beside out_dir and renamed into place when complete: a full disk or a kill leaves the
  # previous out_dir as it was and nothing a later load mistakes for a model. With several
  # processes (a multi-host run) every one writes its shards; the first alone prepares the
  # directory, writes the config and renames.
  partial = out_dir + PARTIAL_SUFFIX
  primary = distributed.is_primary()

  def cleanup():
    if primary:
      storage.remove(partial)

  with storage.writing(out_dir, needed, cleanup):
    storage.check_writable(out_dir, needed)  # by every process: none waits at the barrier for one that stopped
    if primary:
      storage.remove(partial)
      os.makedirs(partial)
    distributed.barrier(f'model_io.save: {partial} prepared')
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(partial, WEIGHTS_DIR), weights)
    checkpointer.wait_until_finished()
    if primary:
      meta = {'format': FORMAT, 'family': family.name, 'task': task, 'dtype': dtype,
              'config': dataclasses.asdict(config), 'tokenizer': '' if tokenizer else tokenizer_source,
              'provenance': provenance or {}}
      if tokenizer is not None:
        tokenizer.save(partial)
      with open(os.path.join(partial, CONFIG_FILE), 'w') as f:
        json.dump(meta, f, indent=2)
      storage.remove(out_dir)
      os.rename(partial, out_dir)
  distributed.barrier(f'model_io.save: {out_dir} written')


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:300] if lines else type(e).__name__


def read_config(model_dir) -> dict[str, Any]:
  """The directory's config.json; one written by an older blip_jax is an error saying what to do."""
  path = os.path.join(os.fspath(model_dir), CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}); the directory is damaged: convert or save the model again') from None
  found = meta.get('format') if isinstance(meta, dict) else None
  if found != FORMAT:
    raise ValueError(f'{path}: format {found!r}, this blip_jax reads {FORMAT!r}; convert the '
                     'checkpoint again (convert_torch_weights.py) or retrain')
  return meta


def model_config(model_dir):
  """(family, task, model config) of a converted directory, without loading weights."""
  meta = read_config(model_dir)
  try:
    family = registry.get(meta.get('family'))
  except ValueError as e:
    raise ValueError(f'{model_dir}/{CONFIG_FILE}: {e}') from None
  config = registry.config_from_dict(family.config_cls, meta['config'], where=f'{model_dir}/{CONFIG_FILE}')
  return family, meta['task'], config


def load(model_dir, *, seed: int = 0, dtype: str = 'float32'):
  """(model, config) of a converted directory; `dtype` is the dtype the floating weights are held
  in ('bfloat16': half the memory, read straight into bf16). PyTorch checkpoints: `blip_jax.load`."""
  import orbax.checkpoint as ocp
  family, task, config = model_config(model_dir)
  model = build_abstract(lambda: family.build(task, config, seed=seed))
  variables = unique_weights(model)
  # Onto this process's first device, whatever devices the weights were saved from (a model
  # trained on many devices or hosts loads on one CPU).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  held = lambda d: jnp.dtype(dtype) if jnp.issubdtype(d, jnp.floating) else d
  target = {path: jax.ShapeDtypeStruct(var.shape, held(var.dtype), sharding=device) for path, var in variables.items()}
  weights_dir = os.path.join(os.path.abspath(os.fspath(model_dir)), WEIGHTS_DIR)
  try:
    restored = ocp.StandardCheckpointer().restore(weights_dir, target)
  except Exception as e:  # noqa: BLE001 - orbax reports mismatches in many ways
    raise ValueError(f'{weights_dir}: cannot be restored into the model {CONFIG_FILE} describes (damaged, '
                     f'incomplete, or written for another model): {_first_line(e)}') from e
  for path, var in variables.items():
    var.set_value(restored.pop(path))
  problem = nonfinite_error(model, weights_dir)
  if problem:
    raise ValueError(problem)
  return model, config


def load_tokenizer(model_dir):
  """The tokenizer of a model directory: its own files, else the source its config.json names
  (a Hub id, resolved through the HF cache), checked against the model's token ids."""
  from blip_jax.data import tokenizer as tokenizers
  family, _, config = model_config(model_dir)
  tok = tokenizers.from_folder(model_dir, family.tokenizer)
  source = read_config(model_dir).get('tokenizer', '')
  if tok is None and source:
    from blip_jax import hub
    tok = tokenizers.from_folder(hub.resolve(source, allow_patterns=hub.TOKENIZER_FILES), family.tokenizer)
  if tok is None:
    raise ValueError(f'{model_dir} holds no tokenizer (vocab.txt or tokenizer/): convert it again with --tokenizer '
                     '(a bert-base-uncased folder for BLIP, the HF model folder for CLIP / OPT), or pass one')
  registry.check_tokenizer(config, tok, where=str(model_dir))
  return tok


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


__all__ = ['load', 'save', 'is_model_dir', 'read_config', 'model_config', 'load_tokenizer', 'FORMAT']
