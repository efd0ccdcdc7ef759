"""BLIP checkpoints (original Salesforce `.pth` and HuggingFace `Blip*`) -> blip_jax models.

Every layout is first renamed to the original Salesforce key names (REFERENCE.md section 8),
which our modules mirror; the model config is inferred from tensor shapes (and an HF folder's
config.json), then `tree.assign` copies the weights and reports every key.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax import registry
from blip_jax.convert.readers import Checkpoint
from blip_jax.convert.tree import (
  ConversionError,
  Report,
  Rules,
  assign,
  count_indexed,
  merge_overrides,
  renamer,
  resize_vit_pos_embed,
)
from blip_jax.models import blip as blip_models
from blip_jax.models.bert import BertConfig
from blip_jax.models.variables import build_abstract, materialise_initial_values
from blip_jax.models.vit import ViTConfig

# HF's BLIP / BLIP-2 ViT names -> the original (timm-style) names our ViT mirrors.
HF_VIT_RENAMES = (
    (r'^vision_model\.embeddings\.class_embedding$', 'visual_encoder.cls_token'),
    (r'^vision_model\.embeddings\.position_embedding$', 'visual_encoder.pos_embed'),
    (r'^vision_model\.embeddings\.patch_embedding\.', 'visual_encoder.patch_embed.proj.'),
    (r'^vision_model\.encoder\.layers\.', 'visual_encoder.blocks.'),
    (r'\.layer_norm1\.', '.norm1.'),
    (r'\.layer_norm2\.', '.norm2.'),
    (r'\.self_attn\.qkv\.', '.attn.qkv.'),
    (r'\.self_attn\.projection\.', '.attn.proj.'),
)
# HuggingFace BLIP names -> original names (applied in order).
HF_RENAMES = HF_VIT_RENAMES + (
    (r'^vision_model\.post_layernorm\.', 'visual_encoder.norm.'),
    (r'^text_model\.', 'text_encoder.'),  # HF BlipModel's text tower
)

# Checkpoint keys that no task model reads, and why.
ALWAYS_UNUSED = (
    (r'\.position_ids$', 'buffer (position indices), not a parameter'),
    (r'^text_encoder\.pooler\.', 'HF BlipModel pooler; BLIP task models read the [CLS] state'),
    (r'^(visual_projection|text_projection|logit_scale)', 'HF BlipModel-only head, not part of BLIP'),
)
TRAINING_STATE = (r'(_m\.|^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr)$)',
                  'training state (momentum copy / feature queue); pass keep_training_state=True')


def detect_layout(keys) -> str:
  keys = set(keys)
  if any(k.startswith(('Qformer.', 'qformer.', 'query_tokens')) for k in keys):
    raise ConversionError('this is a BLIP-2 checkpoint (it has a Q-Former), not a BLIP one')
  if 'vision_model.encoder.layers.0.self_attn.qkv.weight' in keys:
    return 'huggingface'
  if 'visual_encoder.blocks.0.attn.qkv.weight' in keys:
    return 'salesforce'
  sample = sorted(keys)[:5]
  raise ConversionError('not a BLIP checkpoint: expected a fused ViT qkv under '
                        '"visual_encoder.blocks.0.attn.qkv.weight" (Salesforce) or '
                        f'"vision_model.encoder.layers.0.self_attn.qkv.weight" (HuggingFace), found e.g. {sample}')


def detect_task(keys) -> str:
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if has('cls_head.'):
    return 'nlvr'
  if has('text_decoder.') and has('itm_head.'):
    return 'pretrain'
  if has('text_decoder.') and has('text_encoder.'):
    return 'vqa'
  if has('text_decoder.'):
    return 'caption'
  if has('itm_head.'):
    return 'retrieval'
  return 'feature_extractor'



def infer_config(tensors, hf_config, task, overrides) -> blip_models.BlipConfig:
  """BlipConfig from tensor shapes; an HF config.json supplies what shapes cannot (heads, eps)."""
  t = tensors
  keys = list(t)
  patch = t['visual_encoder.patch_embed.proj.weight'].shape[-1]
  width = t['visual_encoder.cls_token'].shape[-1]
  grid = int(round((t['visual_encoder.pos_embed'].shape[1] - 1) ** 0.5))
  vision = dict(width=width, patch_size=patch, image_size=grid * patch,
                depth=count_indexed(keys, r'visual_encoder\.blocks\.(\d+)\.'),
                mlp_dim=t['visual_encoder.blocks.0.mlp.fc1.weight'].shape[0],
                num_heads=width // 64)  # BLIP ViTs use 64-dim heads
  prefix = next((p for p in ('text_encoder.', 'text_decoder.bert.')
                 if f'{p}embeddings.word_embeddings.weight' in t), None)
  if prefix is None:
    raise KeyError('text_encoder.embeddings.word_embeddings.weight')
  vocab, hidden = t[f'{prefix}embeddings.word_embeddings.weight'].shape
  text = dict(vocab_size=vocab, hidden_size=hidden, num_heads=hidden // 64,
              num_layers=count_indexed(keys, re.escape(prefix) + r'encoder\.layer\.(\d+)\.'),
              intermediate_size=t[f'{prefix}encoder.layer.0.intermediate.dense.weight'].shape[0],
              max_position_embeddings=t[f'{prefix}embeddings.position_embeddings.weight'].shape[0],
              encoder_width=width)
  cross = [k for k in keys if '.crossattention.' in k]
  text['add_cross_attention'] = bool(cross) or task in ('caption', 'vqa', 'pretrain')
  if any('.crossattention.self0.' in k for k in cross):
    text['twin_cross_attention'] = True
    merged = [int(m.group(1)) for k in cross if (m := re.search(r'layer\.(\d+)\.crossattention\.output\.merge_layer', k))]
    text['merge_from_layer'] = min(merged) if merged else text['num_layers']
  extra = {}
  if 'vision_proj.weight' in t:
    extra['embed_dim'] = t['vision_proj.weight'].shape[0]
  if 'image_queue' in t:
    extra['queue_size'] = t['image_queue'].shape[1]
  if hf_config:
    vc, tc = hf_config.get('vision_config', {}), hf_config.get('text_config', {})
    for ours, theirs, src in (('num_heads', 'num_attention_heads', vc), ('ln_eps', 'layer_norm_eps', vc),
                              ('act', 'hidden_act', vc)):
      if theirs in src:
        vision[ours] = src[theirs]
    for ours, theirs in (('num_heads', 'num_attention_heads'), ('ln_eps', 'layer_norm_eps'),
                         ('act', 'hidden_act'), ('label_smoothing', 'label_smoothing')):
      if theirs in tc:
        text[ours] = tc[theirs]
    for ours, theirs in (('bos_token_id', 'bos_token_id'), ('sep_token_id', 'sep_token_id'),
                         ('pad_token_id', 'pad_token_id')):
      if theirs in tc:
        extra[ours] = tc[theirs]
    if 'image_text_hidden_size' in hf_config and 'embed_dim' not in extra:
      extra['embed_dim'] = hf_config['image_text_hidden_size']
  for d in (vision, text):  # HF spells exact GELU 'gelu', as we do
    if d.get('act') not in (None, 'gelu', 'quick_gelu', 'relu'):
      raise ConversionError(f"unsupported activation {d['act']!r}")
  overrides = merge_overrides(overrides, vision, text=text)
  text['encoder_width'] = vision['width']
  try:
    return blip_models.BlipConfig(vision=ViTConfig(**vision), text=BertConfig(**text),
                                  **{**extra, **overrides})
  except TypeError as e:
    raise ConversionError(f'bad config override: {e}') from e


def _tie_lm_heads(tensors, cfg, report):
  """BLIP's LM head projects with the word-embedding matrix, and `decoder.bias` is
  `predictions.bias`: drop these copies after checking that they really are copies."""
  for prefix in sorted({k.split('.cls.')[0] for k in tensors if '.cls.predictions.' in k}):
    emb_key = f'{prefix}.bert.embeddings.word_embeddings.weight'
    for key, ref in ((f'{prefix}.cls.predictions.decoder.weight', emb_key),
                     (f'{prefix}.cls.predictions.decoder.bias', f'{prefix}.cls.predictions.bias')):
      if key not in tensors:
        continue
      if key.endswith('decoder.weight') and not cfg.text.tie_word_embeddings:
        continue
      if ref in tensors and not np.array_equal(tensors[key], tensors[ref]):
        raise ConversionError(f'{report.source}: {key!r} differs from {ref!r}; build the model with '
                              "text={'tie_word_embeddings': False} to keep them separate")
      report.skipped[key] = f'tied to {ref}'
      del tensors[key]



def convert(ckpt: Checkpoint, *, task: str = 'auto', strict: bool = True,
            keep_training_state: bool = False, seed: int = 0, **overrides):
  """Build the BLIP model for `task` and fill it from `ckpt`. Returns (model, config, report)."""
  layout = detect_layout(ckpt.tensors)
  tensors = ckpt.tensors.renamed(renamer(HF_RENAMES) if layout == 'huggingface' else str)
  if task == 'auto':
    task = detect_task(tensors)
  if task not in blip_models.TASKS:
    raise ConversionError(f'unknown BLIP task {task!r}; expected one of {sorted(blip_models.TASKS)} or "auto"')
  has_momentum = any('_m.' in k for k in tensors)
  if keep_training_state:
    overrides.setdefault('with_momentum', True)
  try:
    cfg = infer_config(tensors, ckpt.hf_config, task, overrides)
  except KeyError as e:
    raise ConversionError(f'{ckpt.source}: cannot infer the BLIP config, key {e} is missing') from e
  report = Report(source=ckpt.source, layout=layout, task=task)
  _tie_lm_heads(tensors, cfg, report)
  make = lambda: registry.build('blip', task, cfg, seed=seed)
  model = build_abstract(make)  # weights are filled from the checkpoint, never initialised
  expected_missing = []
  if layout == 'huggingface':
    expected_missing.append((r'^temp$', 'HF layout has no ITC temperature; initialised to 0.07'))
  elif 'temp' not in tensors:
    # The original BLIP_ITM class (BLIP's demo) has no temperature: its ITC score is the plain
    # cosine, which is what `similarity` and the Predictor's `itc` give; only contrastive logits
    # (training, zero-shot softmax) use temp.
    expected_missing.append((r'^temp$', "no ITC temperature (a BLIP_ITM state dict); initialised to BLIP's 0.07"))
  if not has_momentum:
    expected_missing.append((r'_m\.', 'no momentum copy in the checkpoint; copied from the online weights'))
    expected_missing.append((r'^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|queue_filled)$',
                             'no queue in the checkpoint; freshly initialised'))
  else:
    expected_missing.append((r'^queue_filled$', 'ours only: every slot of a loaded queue is filled'))

  rules = Rules(
      path_renames=((r'^cls_head\.layers\.', 'cls_head.'),),
      expected_unused=ALWAYS_UNUSED + (() if keep_training_state else (TRAINING_STATE,)),
      expected_missing=tuple(expected_missing),
      resize=((r'pos_embed$', resize_vit_pos_embed),),
  )
  assign(model, tensors, rules, report, strict=strict)
  materialise_initial_values(model, make)  # the expected-missing ones (HF's temp, say)
  if cfg.with_momentum and not has_momentum:
    for online, momentum in model.momentum_pairs():
      nnx.update(momentum, nnx.state(online, nnx.Param))
  if has_momentum and hasattr(model, 'queue_filled'):
    model.queue_filled[...] = jnp.full((1,), cfg.queue_size, jnp.int32)
  return model, cfg, report
