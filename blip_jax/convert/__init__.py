"""PyTorch checkpoints -> blip_jax models.

    model, config, report = blip_jax.convert.load_torch(source, task='caption')

`source` is a checkpoint file (.pth / .pt / .bin / .safetensors), a HuggingFace model folder,
or an in-memory state dict of torch tensors or numpy arrays.
"""

from __future__ import annotations

from blip_jax.convert import blip as _blip
from blip_jax.convert import blip2 as _blip2
from blip_jax.convert import clip as _clip
from blip_jax.convert import opt as _opt
from blip_jax.convert.readers import Checkpoint, read_checkpoint, read_checkpoints
from blip_jax.convert.tree import ConversionError, Report

BLIP_TASKS = ('feature_extractor', 'retrieval', 'caption', 'vqa', 'nlvr', 'pretrain')
TASKS = BLIP_TASKS + ('clip', 'blip2', 'opt')


def load_torch(source, *, task: str = 'auto', strict: bool = True, keep_training_state: bool = False,
               seed: int = 0, **config_overrides):
  """Convert a PyTorch BLIP, BLIP-2, OPT, CLIP or Chinese-CLIP checkpoint into a blip_jax model.

  Args:
    source: path to a checkpoint file or HF folder, a state dict, or a list of these merged
      into one checkpoint (LAVIS BLIP-2 + its EVA ViT + the HF OPT folder).
    task: one of TASKS ('clip' for CLIP, 'blip2' for BLIP-2 stage 1 or 2, 'opt' for a bare
      OPT), or 'auto' to infer it from the keys.
    strict: raise on checkpoint keys that the model does not read and no rule expects
      (with strict=False they are listed in the report instead) and on missing weights.
    keep_training_state: also load momentum encoders and feature queues.
    **config_overrides: config fields (BlipConfig; CLIPConfig plus `act` for CLIP), e.g.
      `image_size=480` (position embeddings are resized), `vision={'num_heads': 2}`,
      `text={'ln_eps': 1e-12}`.

  Returns:
    (model, config, report): the NNX model, its config and a `Report` of every key.
  """
  ckpt = read_checkpoints(source) if isinstance(source, (list, tuple)) else read_checkpoint(source)
  return convert_checkpoint(ckpt, task=task, strict=strict,
                            keep_training_state=keep_training_state, seed=seed, **config_overrides)


def convert_checkpoint(ckpt: Checkpoint, *, task: str = 'auto', strict: bool = True,
                       keep_training_state: bool = False, seed: int = 0, **config_overrides):
  """`load_torch` for an already opened `Checkpoint` (several merged sources, say)."""
  if task == 'blip2' or (task == 'auto' and 'query_tokens' in ckpt.tensors):
    if keep_training_state:
      raise ConversionError('BLIP-2 checkpoints have no training state to keep')
    return _blip2.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  if task == 'opt' or (task == 'auto' and 'model.decoder.embed_tokens.weight' in ckpt.tensors):
    return _opt.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  if task == 'clip' or (task == 'auto' and _looks_like_clip(ckpt.tensors)):
    if keep_training_state:
      raise ConversionError('CLIP checkpoints have no training state to keep')
    return _clip.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  return _blip.convert(ckpt, task, strict=strict, keep_training_state=keep_training_state,
                       seed=seed, **config_overrides)


def _looks_like_clip(tensors) -> bool:
  return 'visual.conv1.weight' in tensors or (
      'vision_model.embeddings.patch_embedding.weight' in tensors
      and 'vision_model.pre_layrnorm.weight' in tensors)  # HF CLIP and Chinese-CLIP, not BLIP


__all__ = ['load_torch', 'convert_checkpoint', 'read_checkpoint', 'read_checkpoints', 'Checkpoint',
           'ConversionError', 'Report', 'BLIP_TASKS', 'TASKS']
