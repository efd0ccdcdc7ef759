"""CLIP checkpoints (OpenAI TorchScript / open_clip state dicts, ViT or ResNet image tower; HF
`CLIPModel` and `ChineseCLIPModel`) -> blip_jax CLIP / ChineseCLIP.

Every layout is renamed to the torch-style names of our modules (`visual.blocks.0.attn.qkv.weight`,
`transformer.resblocks.0.norm1.weight`, ...), with HF's separate q/k/v fused and its
projections transposed to OpenAI's `x @ P` convention; the config is inferred from shapes the
way OpenAI's `build_model` does.
"""

from __future__ import annotations

import numpy as np

from blip_jax import registry
from blip_jax.convert.readers import Checkpoint, TensorStore
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
from blip_jax.models import clip as clip_models
from blip_jax.models.bert import BertConfig
from blip_jax.models.clip_resnet import ModifiedResNetConfig
from blip_jax.models.variables import build_abstract, materialise_initial_values

_BLOCK_RENAMES = (
    (r'\.ln_1\.', '.norm1.'), (r'\.ln_2\.', '.norm2.'),
    (r'\.layer_norm1\.', '.norm1.'), (r'\.layer_norm2\.', '.norm2.'),
    (r'\.attn\.in_proj_weight$', '.attn.qkv.weight'), (r'\.attn\.in_proj_bias$', '.attn.qkv.bias'),
    (r'\.attn\.out_proj\.', '.attn.proj.'), (r'\.self_attn\.out_proj\.', '.attn.proj.'),
    (r'\.mlp\.c_fc\.', '.mlp.fc1.'), (r'\.mlp\.c_proj\.', '.mlp.fc2.'),
)
OPENAI_RENAMES = (
    (r'^visual\.conv1\.', 'visual.patch_embed.proj.'),
    (r'^visual\.class_embedding$', 'visual.cls_token'),
    (r'^visual\.positional_embedding$', 'visual.pos_embed'),
    (r'^visual\.transformer\.resblocks\.', 'visual.blocks.'),
) + _BLOCK_RENAMES
HF_RENAMES = (
    (r'^vision_model\.embeddings\.class_embedding$', 'visual.cls_token'),
    (r'^vision_model\.embeddings\.patch_embedding\.', 'visual.patch_embed.proj.'),
    (r'^vision_model\.embeddings\.position_embedding\.weight$', 'visual.pos_embed'),
    (r'^vision_model\.pre_layrnorm\.', 'visual.ln_pre.'),
    (r'^vision_model\.post_layernorm\.', 'visual.ln_post.'),
    (r'^vision_model\.encoder\.layers\.', 'visual.blocks.'),
    (r'^visual_projection\.weight$', 'visual.proj'),
    (r'^text_model\.embeddings\.token_embedding\.', 'token_embedding.'),
    (r'^text_model\.embeddings\.position_embedding\.weight$', 'positional_embedding'),
    (r'^text_model\.encoder\.layers\.', 'transformer.resblocks.'),
    (r'^text_model\.final_layer_norm\.', 'ln_final.'),
    (r'^text_projection\.weight$', 'text_projection'),
) + _BLOCK_RENAMES
EXPECTED_UNUSED = (
    (r'\.num_batches_tracked$', 'BatchNorm step counter, not used in eval mode'),
    (r'\.position_ids$', 'buffer (position indices), not a parameter'),
    (r'^(input_resolution|context_length|vocab_size)$', 'OpenAI archive metadata, read from shapes'),
    (r'attn_mask$', 'causal mask buffer, rebuilt by the model'),
)


def detect_layout(keys) -> str:
  keys = set(keys)
  if 'visual.conv1.weight' in keys and 'token_embedding.weight' in keys:
    # OpenAI's ModifiedResNet (RN50, ...) has a stem `conv1` too; its attention pool tells it apart.
    return 'openai-resnet' if 'visual.attnpool.positional_embedding' in keys else 'openai'
  if {'vision_model.embeddings.patch_embedding.weight',
      'text_model.embeddings.word_embeddings.weight'} <= keys:
    return 'huggingface-chinese-clip'
  if {'vision_model.embeddings.patch_embedding.weight',
      'text_model.embeddings.token_embedding.weight'} <= keys:
    return 'huggingface'
  raise ConversionError('not a CLIP checkpoint: expected "visual.conv1.weight" + '
                        '"token_embedding.weight" (OpenAI / open_clip) or "vision_model.*" + '
                        '"text_model.*" (HuggingFace CLIPModel / ChineseCLIPModel), found e.g. '
                        f'{sorted(keys)[:5]}')


def normalise(tensors: TensorStore, layout: str) -> TensorStore:
  # The ResNet's keys are our module names already; only the text blocks are renamed.
  renames = {'openai': OPENAI_RENAMES, 'openai-resnet': _BLOCK_RENAMES}.get(layout, HF_RENAMES)
  out = tensors.renamed(renamer(renames))
  if layout.startswith('huggingface'):
    # Fuse q/k/v (rows [q; k; v], as OpenAI's in_proj) and turn Linear weights into x @ P.
    for key in [k for k in out if '.self_attn.q_proj.' in k]:
      parts = [out.pop(key.replace('q_proj', name)) for name in ('q_proj', 'k_proj', 'v_proj')]
      out[key.replace('.self_attn.q_proj.', '.attn.qkv.')] = np.concatenate(parts, axis=0)
    for key in ('visual.proj', 'text_projection'):
      if key in out:
        out[key] = out[key].T
  for key, shape_fn in (('visual.cls_token', lambda a: a.reshape(1, 1, -1)),
                        ('visual.pos_embed', lambda a: a.reshape(1, *a.shape[-2:]))):
    if key in out:
      out[key] = shape_fn(out[key])
  return out


def _hf_fields(section: dict, names) -> dict:
  return {ours: section[theirs] for ours, theirs in names if theirs in section}


HF_FIELDS = (('num_heads', 'num_attention_heads'), ('ln_eps', 'layer_norm_eps'), ('act', 'hidden_act'))


def _resnet_config(t) -> dict:
  """OpenAI's `build_model` for ResNets: blocks per stage, stem width, and the image size from
  the attention pool's positional embedding (one row per cell of the 32x smaller grid, + 1)."""
  grid = int(round((t['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5))
  return dict(layers=tuple(count_indexed(t, rf'visual\.layer{i}\.(\d+)\.') for i in range(1, 5)),
              width=t['visual.layer1.0.conv1.weight'].shape[0], image_size=grid * 32)


def _vision_config(t, hf_config) -> dict:
  width, _, patch, _ = t['visual.patch_embed.proj.weight'].shape
  grid = int(round((t['visual.pos_embed'].shape[1] - 1) ** 0.5))
  vision = dict(width=width, patch_size=patch, image_size=grid * patch, num_heads=width // 64,
                depth=count_indexed(t, r'visual\.blocks\.(\d+)\.'),
                mlp_dim=t['visual.blocks.0.mlp.fc1.weight'].shape[0])
  return {**vision, **_hf_fields((hf_config or {}).get('vision_config', {}), HF_FIELDS)}


def _clip_text_config(t, hf_config) -> dict:
  width = t['ln_final.weight'].shape[0]
  text = dict(width=width, num_heads=width // 64,
              num_layers=count_indexed(t, r'transformer\.resblocks\.(\d+)\.'),
              context_length=t['positional_embedding'].shape[0],
              vocab_size=t['token_embedding.weight'].shape[0])
  if hf_config:
    tc = hf_config.get('text_config', {})
    text.update(_hf_fields(tc, HF_FIELDS))
    eos = tc.get('eos_token_id', 2)
    text['eos_token_id'] = None if eos == 2 else eos  # HF: eos id 2 means the legacy argmax
  return text


TYPE_KEY = 'text_model.embeddings.token_type_embeddings.weight'


def _bert_text_config(t, hf_config) -> dict:
  vocab, hidden = t['text_model.embeddings.word_embeddings.weight'].shape
  text = dict(vocab_size=vocab, hidden_size=hidden, num_heads=hidden // 64, act='gelu',
              num_layers=count_indexed(t, r'text_model\.encoder\.layer\.(\d+)\.'),
              intermediate_size=t['text_model.encoder.layer.0.intermediate.dense.weight'].shape[0],
              max_position_embeddings=t['text_model.embeddings.position_embeddings.weight'].shape[0],
              type_vocab_size=t[TYPE_KEY].shape[0] if TYPE_KEY in t else 0,
              add_cross_attention=False, hidden_dropout=0.0, attention_dropout=0.0)
  return {**text, **_hf_fields((hf_config or {}).get('text_config', {}), HF_FIELDS)}


def infer_config(t, layout, hf_config, act, overrides):
  """CLIPConfig / ChineseCLIPConfig from shapes; an HF config.json adds heads, eps, activation."""
  chinese, resnet = layout == 'huggingface-chinese-clip', layout == 'openai-resnet'
  vision = _resnet_config(t) if resnet else _vision_config(t, hf_config)
  text = _bert_text_config(t, hf_config) if chinese else _clip_text_config(t, hf_config)
  # The activation of the transformers (the ResNet's is ReLU): OpenAI's and HF's configs say it,
  # a plain state dict does not.
  towers = ([] if resnet else [vision]) + ([] if chinese else [text])
  if act is not None:
    for tower in towers:
      tower['act'] = act
  act = act or next((tower['act'] for tower in towers if 'act' in tower), None)
  if act is None:
    raise ConversionError('the activation cannot be read from a CLIP state dict: OpenAI weights use '
                          "act='quick_gelu', open_clip models without '-quickgelu' use act='gelu'; "
                          'pass act=... (TorchScript archives and HF folders need none)')
  for tower in towers:
    tower.setdefault('act', act)
    if tower['act'] not in ('gelu', 'quick_gelu'):
      raise ConversionError(f"unsupported CLIP activation {tower['act']!r}")
  overrides = merge_overrides(overrides, vision, text=text)
  text_cls = BertConfig if chinese else clip_models.CLIPTextConfig
  config_cls = clip_models.ChineseCLIPConfig if chinese else clip_models.CLIPConfig
  vision_cls = ModifiedResNetConfig if resnet else clip_models.clip_vision_config
  try:
    return config_cls(vision=vision_cls(**vision), text=text_cls(**text),
                      embed_dim=t['text_projection'].shape[1], **overrides)
  except TypeError as e:
    raise ConversionError(f'bad config override: {e}') from e


def convert(ckpt: Checkpoint, *, task: str = 'auto', act: str | None = None, strict: bool = True, seed: int = 0,
            **overrides):
  """Build a CLIP (or Chinese-CLIP) model and fill it from `ckpt`; its one task is
  'contrastive'. Returns (model, config, report)."""
  layout = detect_layout(ckpt.tensors)
  tensors = normalise(ckpt.tensors, layout)
  if act is None and ckpt.torchscript:
    act = 'quick_gelu'  # TorchScript archives are OpenAI's own releases
  try:
    cfg = infer_config(tensors, layout, ckpt.hf_config, act, overrides)
  except KeyError as e:
    raise ConversionError(f'{ckpt.source}: cannot infer the CLIP config, key {e} is missing') from e
  report = Report(source=ckpt.source, layout=layout, task='contrastive')
  make = lambda: registry.family_of(cfg).build('contrastive', cfg, seed=seed)
  model = build_abstract(make)  # weights are filled from the checkpoint, never initialised
  rules = Rules(expected_unused=EXPECTED_UNUSED, resize=((r'pos_embed$', resize_vit_pos_embed),))
  assign(model, tensors, rules, report, strict=strict)
  materialise_initial_values(model, make)
  return model, cfg, report
