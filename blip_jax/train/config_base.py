"""Fields every training config has, with their defaults (configs/*.py start from `base()`)."""

from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'
  c.seed = 0
  c.model = ml_collections.ConfigDict()  # family-specific: see blip_jax.train.tasks.model_config
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

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.k_test = 16  # ITM-reranked candidates per query (the originals: 256 COCO, 128 Flickr)
  c.eval.caption_max_length = 30
  c.eval.caption_min_length = 5
  c.eval.num_beams = 1  # > 1: beam search (the originals evaluate captions with 3 beams)
  c.eval.show_captions = 5
  c.eval.meteor = False  # also caption/meteor (needs Java; the METEOR jar comes with pycocoevalcap)
  # Zero-shot classification (zero_shot/top1, top5) with the ITC features of CLIP, BLIP or BLIP-2:
  # `dataset` is any TFDS name (e.g. 'imagenet2012', 'cifar100', 'synthetic_scenes/small'); class
  # i is label value first_label + i; class_names default to the label feature's names.
  c.eval.zero_shot = ml_collections.ConfigDict({
      'dataset': '', 'split': 'validation', 'image_key': 'image', 'label_key': 'label',
      'class_names': (), 'first_label': 0, 'templates': ('a picture of a {}.',)})

  c.log_every_steps = 10
  c.checkpoint_every_steps = 0  # 0 = only the final checkpoint
  c.keep_checkpoints = 2
  c.eval_every_steps = 0  # 0 = evaluate at the end
  return c


def tiny_blip_model() -> ml_collections.ConfigDict:
  """A BLIP small enough to train on 2 CPU cores in minutes (64 px in 8-px patches, 4+4 layers of
  width 128): about 0.55 s per pretraining step at batch 32 on 2 cores."""
  return ml_collections.ConfigDict({
      'vit': 'base', 'image_size': 64, 'embed_dim': 64, 'queue_size': 1024, 'momentum': 0.995,
      'vision': {'width': 128, 'depth': 4, 'num_heads': 4, 'mlp_dim': 512, 'patch_size': 8},
      'text': {'hidden_size': 128, 'num_layers': 4, 'num_heads': 4, 'intermediate_size': 512,
               'max_position_embeddings': 64},
  })


TINY_MODELS = {
    'blip': {'vit': 'base', 'image_size': 32, 'embed_dim': 16, 'queue_size': 32,
             'vision': {'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64, 'patch_size': 16},
             'text': {'hidden_size': 32, 'num_layers': 2, 'num_heads': 2, 'intermediate_size': 64,
                      'max_position_embeddings': 32, 'merge_from_layer': 1}},
    'blip2': {'vit': 'eva_g', 'image_size': 32, 'embed_dim': 16,
              'vision': {'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64, 'patch_size': 16},
              'qformer': {'hidden_size': 32, 'num_layers': 2, 'num_heads': 2, 'intermediate_size': 64,
                          'num_query_tokens': 4, 'max_position_embeddings': 32},
              'opt': '125m',
              'opt_overrides': {'hidden_size': 32, 'num_layers': 2, 'num_heads': 2, 'ffn_dim': 64,
                                'max_position_embeddings': 64}},
    'clip': {'variant': 'ViT-B/16', 'image_size': 32, 'embed_dim': 16,
             'vision': {'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64, 'patch_size': 16},
             'text': {'width': 32, 'num_layers': 2, 'num_heads': 2, 'context_length': 16}},
}


def make_tiny(c: ml_collections.ConfigDict, family: str) -> ml_collections.ConfigDict:
  """The `:tiny` variant of a config (what the tests run): the same task and recipe on
  `synthetic_scenes/tiny` with a tiny model of its family, a few steps at batch 8, no init_from."""
  c.init_from = ''
  c.model = ml_collections.ConfigDict(TINY_MODELS[family])
  c.data.update(name='synthetic_scenes/tiny', vocab='', task='', image_root='', text_length=16, answer_length=6,
                flip=False)
  c.data.annotations = ml_collections.ConfigDict({'train': '', 'validation': '', 'test': ''})
  c.data.train_split, c.data.eval_split = 'train', 'validation'
  c.batch_size, c.num_epochs, c.num_steps = 8, 1, 4
  c.optim.warmup_steps = min(c.optim.warmup_steps, 2)
  c.eval.batch_size, c.eval.k_test = 8, 4
  c.eval.caption_max_length = 8
  c.log_every_steps = 1
  return c
