"""BLIP-2 checkpoints -> blip_jax `Blip2Qformer` (stage 1) / `Blip2OPT` (stage 2).

Layouts: HF `Blip2ForImageTextRetrieval` / `Blip2ForConditionalGeneration` (one folder), and
LAVIS `.pth` files, which omit the frozen parts: give the EVA ViT-g checkpoint (bare `blocks.*`
keys; BLIP-2 uses 39 of its 40 blocks) and, for stage 2, the HF OPT folder as further sources.
HF names are renamed to LAVIS's, which our modules mirror; HF's fused qkv bias
`[q_bias; 0; v_bias]` is split back into EVA's `q_bias` / `v_bias` (its key part must be zero).
"""

from __future__ import annotations

import re

import numpy as np

from blip_jax import registry
from blip_jax.convert.blip import HF_VIT_RENAMES
from blip_jax.convert.clip import OPENAI_RENAMES
from blip_jax.convert.opt import infer_config as opt_infer_config
from blip_jax.convert.opt import tie_lm_head as tie_opt_lm_head
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
from blip_jax.models import blip2 as blip2_models
from blip_jax.models.qformer import QFormerConfig
from blip_jax.models.variables import build_abstract, materialise_initial_values
from blip_jax.models.vit import ViTConfig

HF_RENAMES = HF_VIT_RENAMES + (
    (r'^vision_model\.post_layernorm\.', 'ln_vision.'),
    (r'^qformer\.layernorm\.', 'Qformer.bert.embeddings.LayerNorm.'),
    (r'^embeddings\.(word|position)_embeddings\.', r'Qformer.bert.embeddings.\1_embeddings.'),
    (r'^qformer\.encoder\.', 'Qformer.bert.encoder.'),
    (r'\.attention\.attention\.', '.attention.self.'),
    (r'\.crossattention\.attention\.', '.crossattention.self.'),
    (r'^vision_projection\.', 'vision_proj.'),
    (r'^text_projection\.', 'text_proj.'),
    (r'^language_projection\.', 'opt_proj.'),
    (r'^language_model\.', 'opt_model.'),
)
# Separately given frozen parts of a LAVIS checkpoint: a bare EVA ViT-g or CLIP ViT-L, and a
# bare HF OPT.
BARE_PART_RENAMES = (
    (r'^(cls_token|pos_embed|patch_embed\.|blocks\.|norm\.|fc_norm\.|head\.)', r'visual_encoder.\1'),
    (r'^(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|transformer\.resblocks\.|ln_post\.|proj$)',
     r'visual_encoder.\1'),
    (r'^(model\.decoder\.|lm_head\.)', r'opt_model.\1'),
)
# LAVIS's CLIP ViT-L alternative (`vit_model="clip_L"`) keeps OpenAI's names under
# visual_encoder; they become the shared ViT's names as in `convert/clip.py`.
CLIP_VIT_RENAMES = tuple((pattern.replace('^visual\\.', '^visual_encoder\\.'),
                          repl.replace('visual.', 'visual_encoder.'))
                         for pattern, repl in OPENAI_RENAMES)
EXPECTED_UNUSED = (
    (r'\.position_ids$', 'buffer (position indices), not a parameter'),
    (r'^visual_encoder\.(norm|fc_norm|head)\.', 'EVA classification parts, unused by BLIP-2'),
    (r'^visual_encoder\.(ln_post\.|proj$)', 'CLIP image-head parts, unused by BLIP-2'),
)


def detect_layout(keys) -> str:
  keys = set(keys)
  if 'qformer.encoder.layer.0.attention.attention.query.weight' in keys:
    return 'huggingface'
  if 'Qformer.bert.encoder.layer.0.attention.self.query.weight' in keys:
    return 'lavis'
  raise ConversionError('not a BLIP-2 checkpoint: expected "Qformer.bert.*" (LAVIS) or '
                        f'"qformer.encoder.*" (HuggingFace), found e.g. {sorted(keys)[:5]}')


def split_hf_qkv_bias(tensors) -> None:
  for key in [k for k in tensors if re.match(r'visual_encoder\.blocks\.\d+\.attn\.qkv\.bias$', k)]:
    q, k, v = np.split(tensors.pop(key), 3)
    if np.any(k != 0):
      raise ConversionError(f'{key}: EVA attention has no key bias, but its middle third is non-zero')
    tensors[key.replace('qkv.bias', 'q_bias')] = q
    tensors[key.replace('qkv.bias', 'v_bias')] = v


def infer_config(t, hf_config, bare_vit: bool, clip_vit: bool, overrides) -> blip2_models.Blip2Config:
  keys = list(t)
  width = t['visual_encoder.cls_token'].shape[-1]
  patch = t['visual_encoder.patch_embed.proj.weight'].shape[-1]
  grid = int(round((t['visual_encoder.pos_embed'].shape[1] - 1) ** 0.5))
  depth = count_indexed(keys, r'visual_encoder\.blocks\.(\d+)\.')
  vision = dict(width=width, patch_size=patch, image_size=grid * patch, final_norm=False,
                depth=depth - 1 if bare_vit else depth,  # LAVIS drops EVA ViT-g's last block
                mlp_dim=t['visual_encoder.blocks.0.mlp.fc1.weight'].shape[0],
                num_heads=16 if width == 1408 else width // 64,  # EVA ViT-g: 16 heads of 88
                qkv_bias='qv' if 'visual_encoder.blocks.0.attn.q_bias' in t else 'qkv')
  if clip_vit:  # LAVIS's CLIP ViT-L: OpenAI's tower without ln_post (ln_vision follows)
    vision.update(num_heads=width // 64, patch_bias=False, pre_norm=True, act='quick_gelu', ln_eps=1e-5)
  hidden = t['query_tokens'].shape[-1]
  cross = sorted({int(m.group(1)) for k in keys
                  if (m := re.match(r'Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.', k))})
  num_layers = count_indexed(keys, r'Qformer\.bert\.encoder\.layer\.(\d+)\.')
  # Cross-attention sits in every freq-th layer from 0; a single one (0) means freq >= num_layers.
  freq = cross[1] - cross[0] if len(cross) > 1 else max(num_layers, 1)
  if cross != list(range(0, num_layers, freq)):
    raise ValueError(f'Q-Former cross-attention in layers {cross} of {num_layers}: not every n-th layer from 0')
  qformer = dict(hidden_size=hidden, num_heads=hidden // 64, num_layers=num_layers,
                 intermediate_size=t['Qformer.bert.encoder.layer.0.intermediate_query.dense.weight'].shape[0],
                 encoder_width=width, num_query_tokens=t['query_tokens'].shape[1], cross_attention_freq=freq,
                 text_input='Qformer.bert.embeddings.word_embeddings.weight' in t)
  if qformer['text_input']:
    qformer['vocab_size'] = t['Qformer.bert.embeddings.word_embeddings.weight'].shape[0]
    qformer['max_position_embeddings'] = t['Qformer.bert.embeddings.position_embeddings.weight'].shape[0]
  extra = {'embed_dim': t['vision_proj.weight'].shape[0]} if 'vision_proj.weight' in t else {}
  hf_config = hf_config or {}
  blip2_hf = hf_config if 'qformer_config' in hf_config else {}
  opt_hf = blip2_hf.get('text_config') or (hf_config if hf_config.get('model_type') == 'opt' else None)
  vc, qc = blip2_hf.get('vision_config', {}), blip2_hf.get('qformer_config', {})
  for ours, theirs in (('num_heads', 'num_attention_heads'), ('ln_eps', 'layer_norm_eps'),
                       ('act', 'hidden_act')):
    if theirs in vc:
      vision[ours] = vc[theirs]
    if theirs in qc:
      qformer[ours] = qc[theirs]
  if 'layer_norm_eps' in vc:
    extra['ln_vision_eps'] = vc['layer_norm_eps']  # HF's post_layernorm shares the layers' eps
  overrides = merge_overrides(overrides, vision, qformer=qformer)
  if 'opt_proj.weight' in t:
    if 'opt_model.model.decoder.embed_tokens.weight' not in t:
      raise ConversionError('a BLIP-2 OPT checkpoint without the OPT weights: LAVIS files omit the '
                            'frozen LLM, give its HF folder (e.g. opt-2.7b) as another source')
    extra['opt'] = opt_infer_config(t, 'opt_model.', opt_hf, overrides.pop('opt', {}) or {})
  try:
    return blip2_models.Blip2Config(vision=ViTConfig(**vision), qformer=QFormerConfig(**qformer),
                                    **{**extra, **overrides})
  except TypeError as e:
    raise ConversionError(f'bad config override: {e}') from e


def _lavis_caption_end(cfg, files):
  """LAVIS's BLIP-2 OPT ends captions and answers at '\\n' (its `eos_token_id`), not at OPT's
  `</s>` (HF's BLIP-2 configs store the same): take its id from the OPT folder's tokenizer."""
  import dataclasses
  import os

  from blip_jax.data.tokenizer import HFTokenizer, from_folder
  for folder in dict.fromkeys(os.path.dirname(f) for f in files):
    tok = from_folder(folder, 'hf')
    if isinstance(tok, HFTokenizer):
      return dataclasses.replace(cfg, opt=dataclasses.replace(cfg.opt, eos_token_id=tok.token_id('\n')))
  return cfg


def _tie_lm_head(tensors, report):
  for key, ref in (('Qformer.cls.predictions.decoder.weight', 'Qformer.bert.embeddings.word_embeddings.weight'),
                   ('Qformer.cls.predictions.decoder.bias', 'Qformer.cls.predictions.bias')):
    if key in tensors and ref in tensors:
      if not np.array_equal(tensors[key], tensors[ref]):
        raise ConversionError(f'{report.source}: {key!r} differs from {ref!r}, but they are one weight')
      report.skipped[key] = f'tied to {ref}'
      del tensors[key]


def convert(ckpt: Checkpoint, *, task: str = 'auto', strict: bool = True, seed: int = 0, **overrides):
  """Build the BLIP-2 model of `task` ('stage1': the Q-Former with its heads, 'stage2': with OPT;
  'auto': stage 2 when the checkpoint has `opt_proj`) and fill it from `ckpt`. Returns (model,
  config, report)."""
  layout = detect_layout(ckpt.tensors)
  bare_vit = any(k in ckpt.tensors for k in ('blocks.0.attn.qkv.weight', 'conv1.weight'))
  clip_vit = any(k in ckpt.tensors for k in ('conv1.weight', 'visual_encoder.conv1.weight'))
  renames = ((HF_RENAMES if layout == 'huggingface' else ()) + BARE_PART_RENAMES
             + (CLIP_VIT_RENAMES if clip_vit else ()))
  tensors = ckpt.tensors.renamed(renamer(renames))
  if layout == 'huggingface' and not clip_vit:
    split_hf_qkv_bias(tensors)
  if clip_vit:
    tensors['visual_encoder.cls_token'] = tensors['visual_encoder.cls_token'].reshape(1, 1, -1)
    tensors['visual_encoder.pos_embed'] = tensors['visual_encoder.pos_embed'][None]
  try:
    cfg = infer_config(tensors, ckpt.hf_config, bare_vit, clip_vit, overrides)
  except KeyError as e:
    raise ConversionError(f'{ckpt.source}: cannot infer the BLIP-2 config, key {e} is missing'
                          + (' (LAVIS checkpoints omit the frozen ViT: give its checkpoint too)'
                             if 'visual_encoder' in str(e) else '')) from e
  if layout == 'lavis' and cfg.opt is not None:
    cfg = _lavis_caption_end(cfg, ckpt.files)
  if task == 'auto':
    task = 'stage1' if cfg.opt is None else 'stage2'
  if (task == 'stage2') != (cfg.opt is not None):
    raise ConversionError(f'{ckpt.source}: task {task!r}, but the checkpoint '
                          + ('has no OPT (opt_proj)' if cfg.opt is None else 'is BLIP-2 with OPT (stage2)'))
  report = Report(source=ckpt.source, layout=layout, task=task)
  _tie_lm_head(tensors, report)
  if cfg.opt is not None:
    tie_opt_lm_head(tensors, 'opt_model.', report)
  make = lambda: registry.build('blip2', task, cfg, seed=seed)
  model = build_abstract(make)
  expected_missing = []
  if layout == 'huggingface' and cfg.opt is None:
    expected_missing += [(r'^temp$', 'HF layout has no ITC temperature; initialised to 0.07'),
                         (r'^Qformer\.cls\.', 'HF Blip2ForImageTextRetrieval has no ITG head; initialised')]
  unused = EXPECTED_UNUSED
  if bare_vit:
    unused += ((rf'^visual_encoder\.blocks\.{cfg.vision.depth}\.', 'the last EVA block, which BLIP-2 drops'),)
  rules = Rules(expected_unused=unused, expected_missing=tuple(expected_missing),
                resize=((r'pos_embed$', resize_vit_pos_embed),))
  assign(model, tensors, rules, report, strict=strict)
  materialise_initial_values(model, make)
  return model, cfg, report
