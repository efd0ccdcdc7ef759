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
from blip_jax.models import blip as _blip_models

BLIP_TASKS = tuple(_blip_models.TASKS)
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
  family = {'clip': 'clip', 'blip2': 'blip2', 'opt': 'opt'}.get(task, 'blip')
  if task == 'auto':
    family = detect_family(ckpt.tensors)
  if keep_training_state and family != 'blip':
    raise ConversionError(f'{family} checkpoints have no training state to keep')
  if family == 'blip2':
    return _blip2.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  if family == 'opt':
    return _opt.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  if family == 'clip':
    return _clip.convert(ckpt, strict=strict, seed=seed, **config_overrides)
  return _blip.convert(ckpt, task, strict=strict, keep_training_state=keep_training_state,
                       seed=seed, **config_overrides)


# (family, description, a key that identifies it); the first match wins.
SIGNATURES = (
    ('blip2', 'BLIP-2 (LAVIS `query_tokens` + `Qformer.bert.*`, HF `Blip2*`)', 'query_tokens'),
    ('clip', 'CLIP (OpenAI / open_clip `visual.conv1.weight`)', 'visual.conv1.weight'),
    ('clip', 'CLIP / Chinese-CLIP (HF `vision_model.pre_layrnorm.*`)', 'vision_model.pre_layrnorm.weight'),
    ('blip', 'BLIP (Salesforce `visual_encoder.blocks.*`)', 'visual_encoder.blocks.0.attn.qkv.weight'),
    ('blip', 'BLIP (HF `vision_model.encoder.layers.*.self_attn.qkv`)',
     'vision_model.encoder.layers.0.self_attn.qkv.weight'),
    ('opt', 'OPT (HF `model.decoder.*`)', 'model.decoder.embed_tokens.weight'),
)


def detect_family(tensors) -> str:
  for family, _, key in SIGNATURES:
    if key in tensors:
      return family
  known = '; '.join(description for _, description, _ in SIGNATURES)
  raise ConversionError(f'unrecognised checkpoint layout (keys e.g. {sorted(tensors)[:5]}); '
                        f'recognised layouts: {known}')


__all__ = ['load_torch', 'convert_checkpoint', 'read_checkpoint', 'read_checkpoints', 'Checkpoint',
           'ConversionError', 'Report', 'BLIP_TASKS', 'TASKS']
