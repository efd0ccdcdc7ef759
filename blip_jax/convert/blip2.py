"""BLIP-2 stage-1 checkpoints (LAVIS `Blip2Qformer` names, HF `Blip2ForImageTextRetrieval`)
-> blip_jax `Blip2Qformer`.

HF names are renamed to LAVIS's, which our modules mirror; HF's fused qkv bias
`[q_bias; 0; v_bias]` is split back into EVA's `q_bias` / `v_bias` (its key part must be zero).
"""

from __future__ import annotations

import re

import numpy as np

from blip_jax.convert.readers import Checkpoint
from blip_jax.convert.tree import (ConversionError, Report, Rules, assign, build_abstract,
                                   count_indexed, materialise_initial_values, resize_vit_pos_embed)
from blip_jax.models import blip2 as blip2_models
from blip_jax.models.qformer import QFormerConfig
from blip_jax.models.vit import ViTConfig

HF_RENAMES = (
    (r'^vision_model\.embeddings\.class_embedding$', 'visual_encoder.cls_token'),
    (r'^vision_model\.embeddings\.position_embedding$', 'visual_encoder.pos_embed'),
    (r'^vision_model\.embeddings\.patch_embedding\.', 'visual_encoder.patch_embed.proj.'),
    (r'^vision_model\.encoder\.layers\.', 'visual_encoder.blocks.'),
    (r'^vision_model\.post_layernorm\.', 'ln_vision.'),
    (r'\.layer_norm1\.', '.norm1.'), (r'\.layer_norm2\.', '.norm2.'),
    (r'\.self_attn\.qkv\.', '.attn.qkv.'), (r'\.self_attn\.projection\.', '.attn.proj.'),
    (r'^qformer\.layernorm\.', 'Qformer.bert.embeddings.LayerNorm.'),
    (r'^embeddings\.(word|position)_embeddings\.', r'Qformer.bert.embeddings.\1_embeddings.'),
    (r'^qformer\.encoder\.', 'Qformer.bert.encoder.'),
    (r'\.attention\.attention\.', '.attention.self.'),
    (r'\.crossattention\.attention\.', '.crossattention.self.'),
    (r'^vision_projection\.', 'vision_proj.'),
    (r'^text_projection\.', 'text_proj.'),
)
EXPECTED_UNUSED = ((r'\.position_ids$', 'buffer (position indices), not a parameter'),)


def detect_layout(keys) -> str:
  keys = set(keys)
  if 'qformer.encoder.layer.0.attention.attention.query.weight' in keys:
    return 'huggingface'
  if 'Qformer.bert.encoder.layer.0.attention.self.query.weight' in keys:
    return 'lavis'
  raise ConversionError('not a BLIP-2 checkpoint: expected "Qformer.bert.*" (LAVIS) or '
                        f'"qformer.encoder.*" (HuggingFace), found e.g. {sorted(keys)[:5]}')


def _rename(key: str) -> str:
  for pattern, repl in HF_RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def split_hf_qkv_bias(tensors) -> None:
  for key in [k for k in tensors if re.match(r'visual_encoder\.blocks\.\d+\.attn\.qkv\.bias$', k)]:
    q, k, v = np.split(tensors.pop(key), 3)
    if np.any(k != 0):
      raise ConversionError(f'{key}: EVA attention has no key bias, but its middle third is non-zero')
    tensors[key.replace('qkv.bias', 'q_bias')] = q
    tensors[key.replace('qkv.bias', 'v_bias')] = v


def infer_config(t, hf_config, overrides) -> blip2_models.Blip2Config:
  keys = list(t)
  width = t['visual_encoder.cls_token'].shape[-1]
  patch = t['visual_encoder.patch_embed.proj.weight'].shape[-1]
  grid = int(round((t['visual_encoder.pos_embed'].shape[1] - 1) ** 0.5))
  vision = dict(width=width, patch_size=patch, image_size=grid * patch, final_norm=False,
                depth=count_indexed(keys, r'visual_encoder\.blocks\.(\d+)\.'),
                mlp_dim=t['visual_encoder.blocks.0.mlp.fc1.weight'].shape[0],
                num_heads=16 if width == 1408 else width // 64,  # EVA ViT-g: 16 heads of 88
                qkv_bias='qv' if 'visual_encoder.blocks.0.attn.q_bias' in t else 'qkv')
  vocab, hidden = t['Qformer.bert.embeddings.word_embeddings.weight'].shape
  cross = sorted({int(m.group(1)) for k in keys
                  if (m := re.match(r'Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.', k))})
  qformer = dict(vocab_size=vocab, hidden_size=hidden, num_heads=hidden // 64,
                 num_layers=count_indexed(keys, r'Qformer\.bert\.encoder\.layer\.(\d+)\.'),
                 intermediate_size=t['Qformer.bert.encoder.layer.0.intermediate_query.dense.weight'].shape[0],
                 max_position_embeddings=t['Qformer.bert.embeddings.position_embeddings.weight'].shape[0],
                 encoder_width=width, num_query_tokens=t['query_tokens'].shape[1],
                 cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else 1)
  extra = {'embed_dim': t['vision_proj.weight'].shape[0]} if 'vision_proj.weight' in t else {}
  if hf_config:
    vc, qc = hf_config.get('vision_config', {}), hf_config.get('qformer_config', {})
    for ours, theirs in (('num_heads', 'num_attention_heads'), ('ln_eps', 'layer_norm_eps'),
                         ('act', 'hidden_act')):
      if theirs in vc:
        vision[ours] = vc[theirs]
      if theirs in qc:
        qformer[ours] = qc[theirs]
    if 'layer_norm_eps' in vc:
      extra['ln_vision_eps'] = vc['layer_norm_eps']  # HF's post_layernorm shares the layers' eps
  overrides = dict(overrides)
  vision.update(overrides.pop('vision', {}) or {})
  if 'image_size' in overrides:
    vision['image_size'] = overrides.pop('image_size')
  qformer.update(overrides.pop('qformer', {}) or {})
  try:
    return blip2_models.Blip2Config(vision=ViTConfig(**vision), qformer=QFormerConfig(**qformer),
                                    **{**extra, **overrides})
  except TypeError as e:
    raise ConversionError(f'bad config override: {e}') from e


def _tie_lm_head(tensors, report):
  for key, ref in (('Qformer.cls.predictions.decoder.weight', 'Qformer.bert.embeddings.word_embeddings.weight'),
                   ('Qformer.cls.predictions.decoder.bias', 'Qformer.cls.predictions.bias')):
    if key in tensors and ref in tensors:
      if not np.array_equal(tensors[key], tensors[ref]):
        raise ConversionError(f'{report.source}: {key!r} differs from {ref!r}, but they are one weight')
      report.skipped[key] = f'tied to {ref}'
      del tensors[key]


def convert(ckpt: Checkpoint, *, strict: bool = True, seed: int = 0, **overrides):
  """Build the BLIP-2 stage-1 model and fill it from `ckpt`. Returns (model, config, report)."""
  layout = detect_layout(ckpt.tensors)
  tensors = ckpt.tensors.renamed(_rename if layout == 'huggingface' else str)
  if layout == 'huggingface':
    split_hf_qkv_bias(tensors)
  try:
    cfg = infer_config(tensors, ckpt.hf_config, overrides)
  except KeyError as e:
    raise ConversionError(f'{ckpt.source}: cannot infer the BLIP-2 config, key {e} is missing'
                          + (' (LAVIS checkpoints omit the frozen ViT: give its checkpoint too)'
                             if 'visual_encoder' in str(e) else '')) from e
  report = Report(source=ckpt.source, layout=layout, task='blip2')
  _tie_lm_head(tensors, report)
  make = lambda: blip2_models.build(cfg, seed=seed)
  model = build_abstract(make)
  expected_missing = []
  if layout == 'huggingface':
    expected_missing += [(r'^temp$', 'HF layout has no ITC temperature; initialised to 0.07'),
                         (r'^Qformer\.cls\.', 'HF Blip2ForImageTextRetrieval has no ITG head; initialised')]
  rules = Rules(expected_unused=EXPECTED_UNUSED, expected_missing=tuple(expected_missing),
                resize=((r'pos_embed$', resize_vit_pos_embed),))
  assign(model, tensors, rules, report, strict=strict)
  materialise_initial_values(model, make)
  return model, cfg, report
