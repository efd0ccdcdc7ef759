"""PyTorch checkpoints -> blip_jax models.

    model, config, report = blip_jax.convert.load_torch(source, task='caption')

`source` is a checkpoint file (.pth / .pt / .bin / .safetensors), a HuggingFace model folder,
or an in-memory state dict of torch tensors or numpy arrays. The family is detected from the
keys (`blip_jax.registry`) and its converter (`convert/<family>.py`) does the rest.
"""

from __future__ import annotations

import inspect

from blip_jax import registry
from blip_jax.convert.readers import Checkpoint, read_checkpoint, read_checkpoints
from blip_jax.convert.tree import ConversionError, Report
from blip_jax.models.variables import nonfinite_error


def load_torch(source, *, family: str = 'auto', task: str = 'auto', strict: bool = True,
               keep_training_state: bool = False, seed: int = 0, **config_overrides):
  """Convert a PyTorch BLIP, BLIP-2, OPT, CLIP or Chinese-CLIP checkpoint into a blip_jax model.

  Args:
    source: path to a checkpoint file or HF folder, a state dict, or a list of these merged
      into one checkpoint (LAVIS BLIP-2 + its EVA ViT + the HF OPT folder).
    family: a `blip_jax.registry.FAMILIES` name, or 'auto' to infer it from the keys.
    task: one of the family's tasks (BLIP: feature_extractor, retrieval, caption, vqa, nlvr,
      pretrain; BLIP-2: stage1, stage2), or 'auto' to infer it from the keys.
    strict: raise on checkpoint keys that the model does not read and no rule expects
      (with strict=False they are listed in the report instead) and on missing weights.
    keep_training_state: also load momentum encoders and feature queues (BLIP).
    **config_overrides: config fields (BlipConfig; CLIPConfig plus `act` for CLIP), e.g.
      `image_size=480` (position embeddings are resized), `vision={'num_heads': 2}`,
      `text={'ln_eps': 1e-12}`.

  Returns:
    (model, config, report): the NNX model, its config and a `Report` of every key.
  """
  ckpt = read_checkpoints(source) if isinstance(source, (list, tuple)) else read_checkpoint(source)
  return convert_checkpoint(ckpt, family=family, task=task, strict=strict,
                            keep_training_state=keep_training_state, seed=seed, **config_overrides)


def convert_checkpoint(ckpt: Checkpoint, *, family: str = 'auto', task: str = 'auto', strict: bool = True,
                       keep_training_state: bool = False, seed: int = 0, **config_overrides):
  """`load_torch` for an already opened `Checkpoint` (several merged sources, say)."""
  try:
    fam = registry.detect(ckpt.tensors) if family == 'auto' else registry.get(family)
  except ValueError as e:
    raise ConversionError(f'{ckpt.source}: {e}') from None
  if task != 'auto' and task not in fam.tasks:
    raise ConversionError(f'unknown {fam.name} task {task!r}; expected one of {sorted(fam.tasks)} or "auto"')
  if keep_training_state:
    if 'keep_training_state' not in inspect.signature(fam.convert_fn).parameters:
      raise ConversionError(f'{fam.name} checkpoints have no training state to keep')
    config_overrides['keep_training_state'] = True
  try:
    model, config, report = fam.convert_fn(ckpt, task=task, strict=strict, seed=seed, **config_overrides)
  except ConversionError as e:
    if ckpt.source in str(e):
      raise
    raise ConversionError(f'{ckpt.source}: {e}') from None
  problem = nonfinite_error(model, ckpt.source)
  if problem:
    raise ConversionError(problem)
  return model, config, report


__all__ = ['load_torch', 'convert_checkpoint', 'read_checkpoint', 'read_checkpoints', 'Checkpoint',
           'ConversionError', 'Report']
