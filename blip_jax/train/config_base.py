"""Fields every training config has, with their defaults (configs/*.py start from `base()`), and
the helpers the config files share.

`config.model` holds exactly the fields of the objective's model config class (`BlipConfig`,
`Blip2Config`, `CLIPConfig`: `model_fields(blip.blip_config('base', 384))`), so every field can
be overridden on the command line (`--config.model.vision.drop_path_rate=0.1`); the vocabulary
size and special token ids are taken from the tokenizer (`blip_jax.registry.with_tokenizer`).
`config.evals` names the evaluators (`blip_jax.evaluate.settings`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from blip_jax.models import blip, blip2, clip, opt, qformer, vit


def model_fields(model_config) -> ml_collections.ConfigDict:
  """A model config dataclass as a run config's `model` section (every field, nested)."""
  return ml_collections.ConfigDict(dataclasses.asdict(model_config))


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = 'pretrain'  # blip_jax.train.objectives.OBJECTIVES
  c.seed = 0
  c.model = ml_collections.ConfigDict()  # the objective's model config fields: model_fields(...)
  c.dtype = ''  # compute dtype of every tower ('bfloat16'; parameters stay float32); '' = config.model's
  c.init_from = ''  # a converted model directory (convert_torch_weights.py) to start from
  c.eval_only = False
  c.freeze = ()  # extra parameter-path regexes to keep frozen

  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic_scenes/small'
  c.data.data_dir = ''  # TFDS data_dir ('' = ~/tensorflow_datasets)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.vocab = ''  # vocab.txt or bert-base-uncased folder ('' = the dataset's own, synthetic_scenes)
  c.data.text_length = 30
  c.data.answer_length = 8
  c.data.num_answers = 4
  # blip_annotations only: task, {split: JSON path}, image_root (see the README, "Your own data").
  c.data.task = ''
  c.data.annotations = ml_collections.ConfigDict({'train': '', 'validation': '', 'test': ''})
  c.data.image_root = ''
  c.data.config_name = 'custom'  # the TFDS config name the built dataset is stored under
  c.data.skip_bad_examples = False
  c.data.images_outside_root = False  # blip_annotations: image paths may leave image_root (../, absolute)
  # Training images: RandomResizedCrop(scale min_scale..1), horizontal flip, RandAugment ops.
  c.data.min_scale = 0.5
  c.data.flip = True
  c.data.randaugment_ops = 2

  c.batch_size = 32  # global, over all devices and hosts
  c.num_epochs = 1
  c.num_steps = 0  # > 0 overrides num_epochs
  c.alpha = 0.4  # ITC distillation weight, ramped up over alpha_ramp_epochs
  c.alpha_ramp_epochs = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.schedule = 'cosine'  # cosine | step | warmup_cosine | constant (blip_jax.train.optim)
  c.optim.lr = 1e-5
  c.optim.min_lr = 0.0
  # Linear warmup from warmup_lr, in epoch 0 only (the originals): a warmup longer than an epoch
  # is cut at its end. Counted in optimiser steps; not with schedule='cosine'.
  c.optim.warmup_steps = 0
  c.optim.warmup_lr = 0.0
  c.optim.decay_rate = 0.9  # schedule='step': lr * decay_rate ** epoch
  c.optim.weight_decay = 0.05  # AdamW, on weight matrices only (blip_jax.train.optim)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 0.0  # clip the global gradient norm to this; 0 = off
  # Optimiser step every grad_accum micro-batches, on the mean of their gradients. That is one
  # grad_accum times larger batch only for losses that average over examples (captioning with
  # equal token counts, VQA, NLVR2). The contrastive losses (ITC with its in-batch negatives,
  # ITM's hard negatives, CLIP's InfoNCE) are not decomposable: each micro-batch is its own,
  # smaller set of negatives.
  c.optim.grad_accum = 1

  # Devices as a data x fsdp mesh (-1: what the other axis leaves). With fsdp > 1, every state
  # leaf of at least fsdp_min_size elements is split over the fsdp axis (ZeRO-3 style).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'fsdp_min_size': 1 << 14})

  # Evaluators on the eval split: {name: blip_jax.evaluate.settings(type, ...)}.
  c.evals = ml_collections.ConfigDict()

  c.log_every_steps = 10
  c.checkpoint_every_steps = 0  # 0 = only the final checkpoint
  c.keep_checkpoints = 2
  c.eval_every_steps = 0  # 0 = evaluate at the end
  return c


# ------------------------------------------------------------------------------ tiny models

def tiny_blip() -> blip.BlipConfig:
  """The `:tiny` BLIP of the tests: 32 px in 16-px patches, 2 + 2 layers of width 32."""
  return blip.blip_config('base', 32, vision=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=16),
                          text=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, merge_from_layer=1),
                          embed_dim=16, queue_size=32)


def tiny_blip2(stage2: bool = False) -> blip2.Blip2Config:
  """The `:tiny` BLIP-2: an EVA-style ViT and a Q-Former of 2 layers, 4 queries; with `stage2` an
  OPT of 2 layers instead of the Q-Former's text side."""
  return blip2.Blip2Config(
      vision=vit.vit_config('eva_g', image_size=32, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=16),
      qformer=qformer.QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, encoder_width=32,
                                    num_query_tokens=4, max_position_embeddings=32, text_input=not stage2),
      embed_dim=16,
      opt=opt.OPTConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64, max_position_embeddings=64)
      if stage2 else None)


def tiny_clip() -> clip.CLIPConfig:
  return clip.clip_config('ViT-B/16', vision=dict(image_size=32, width=32, depth=2, num_heads=2, mlp_dim=64,
                                                  patch_size=16),
                          text=dict(width=32, num_layers=2, num_heads=2, context_length=16), embed_dim=16)


def make_tiny(c: ml_collections.ConfigDict, model_config) -> ml_collections.ConfigDict:
  """The `:tiny` variant of a config (what the tests run): the same objective and recipe on
  `synthetic_scenes/tiny` with a tiny model of its family, a few steps at batch 8, no init_from."""
  c.init_from = ''
  c.model = model_fields(model_config)
  c.data.update(name='synthetic_scenes/tiny', vocab='', task='', image_root='', text_length=16, answer_length=6,
                flip=False)
  c.data.annotations = ml_collections.ConfigDict({'train': '', 'validation': '', 'test': ''})
  c.data.train_split, c.data.eval_split = 'train', 'validation'
  c.batch_size, c.num_epochs, c.num_steps = 8, 1, 4
  c.optim.warmup_steps = min(c.optim.warmup_steps, 2)
  for evaluator in c.evals.values():
    evaluator.batch_size = 8
    if 'k_test' in evaluator and evaluator.k_test:
      evaluator.k_test = 4
    if 'max_length' in evaluator:
      evaluator.max_length = 8
  c.log_every_steps = 1
  return c
