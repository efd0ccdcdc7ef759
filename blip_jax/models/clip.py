"""CLIP (OpenAI / open_clip / HF `CLIPModel`): a ViT or ResNet image tower and a causal text
transformer; Chinese-CLIP (HF `ChineseCLIPModel`): the same image towers with a BERT text tower.

The image tower is the project's ViT in its CLIP variant (no patch bias, `ln_pre`, no final
norm, QuickGELU or GELU) plus `ln_post` on the class token and the projection `proj`; the text
tower reuses the same pre-norm block. Projections are used as `x @ P`, as OpenAI stores them.
Attribute names follow the OpenAI module names (`token_embedding`, `positional_embedding`,
`transformer.resblocks[i]`, `ln_final`, `text_projection`, `logit_scale`); inside the image
tower they follow the shared ViT (`visual.blocks[i].attn.qkv`, ...) or OpenAI's ResNet
(`clip_resnet.py`, chosen by a `ModifiedResNetConfig` as `vision`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers
from blip_jax.models.bert import BertConfig, BertModel
from blip_jax.models.clip_resnet import ModifiedResNet, ModifiedResNetConfig  # noqa: F401 (re-exported)
from blip_jax.models.vit import Block, VisionTransformer, ViTConfig


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  width: int = 512
  num_layers: int = 12
  num_heads: int = 8
  context_length: int = 77
  ln_eps: float = 1e-5
  act: str = 'quick_gelu'
  # Pooling position: None = argmax of the token ids (OpenAI: EOT has the largest id), else the
  # first occurrence of this id (HF configs with a corrected eos_token_id).
  eos_token_id: int | None = None
  dtype: str = 'float32'


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: ViTConfig | ModifiedResNetConfig = ViTConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  embed_dim: int = 512


def clip_vision_config(**kw) -> ViTConfig:
  return ViTConfig(**{'patch_bias': False, 'pre_norm': True, 'final_norm': False, 'ln_eps': 1e-5,
                      'act': 'quick_gelu', **kw})


def _resnet(layers, width, image_size, text_width, embed_dim):
  return dict(vision=dict(layers=layers, width=width, image_size=image_size),
              text=dict(width=text_width, num_heads=text_width // 64), embed_dim=embed_dim)


# OpenAI's released architectures (text: 12 layers, heads = width / 64).
CLIP_VARIANTS = {
    'RN50': _resnet((3, 4, 6, 3), 64, 224, 512, 1024),
    'RN101': _resnet((3, 4, 23, 3), 64, 224, 512, 512),
    'RN50x4': _resnet((4, 6, 10, 6), 80, 288, 640, 640),
    'RN50x16': _resnet((6, 8, 18, 8), 96, 384, 768, 768),
    'RN50x64': _resnet((3, 15, 36, 10), 128, 448, 1024, 1024),
    'ViT-B/32': dict(vision=dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=32,
                                 image_size=224), text=dict(width=512, num_heads=8), embed_dim=512),
    'ViT-B/16': dict(vision=dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16,
                                 image_size=224), text=dict(width=512, num_heads=8), embed_dim=512),
    'ViT-L/14': dict(vision=dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14,
                                 image_size=224), text=dict(width=768, num_heads=12), embed_dim=768),
    'ViT-L/14-336': dict(vision=dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14,
                                     image_size=336), text=dict(width=768, num_heads=12), embed_dim=768),
}


def clip_config(variant: str = 'ViT-B/16', *, vision: dict | None = None, text: dict | None = None,
                **overrides) -> CLIPConfig:
  """Named CLIP config ('RN50', ..., 'RN50x64', 'ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14-336')
  with overrides."""
  if variant not in CLIP_VARIANTS:
    raise ValueError(f'unknown CLIP variant {variant!r}; expected one of {sorted(CLIP_VARIANTS)}')
  base = CLIP_VARIANTS[variant]
  vision_cls = ModifiedResNetConfig if 'layers' in base['vision'] else clip_vision_config
  return CLIPConfig(vision=vision_cls(**{**base['vision'], **(vision or {})}),
                    text=CLIPTextConfig(**{**base['text'], **(text or {})}),
                    **{'embed_dim': base['embed_dim'], **overrides})


class CLIPVisual(VisionTransformer):
  """The CLIP image tower: ViT tokens -> ln_post(class token) @ proj."""

  def __init__(self, cfg: ViTConfig, embed_dim: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.ln_post = layers.layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, dtype=jnp.dtype(cfg.dtype))
    self.proj = nnx.Param(layers.INIT(rngs.params(), (cfg.width, embed_dim)))

  def features(self, images):
    tokens = super().__call__(images)
    return self.ln_post(tokens[:, 0]) @ self.proj[...].astype(tokens.dtype)


class TextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.resblocks = nnx.List([
        Block(cfg.width, cfg.num_heads, 4 * cfg.width, ln_eps=cfg.ln_eps, act=cfg.act,
              dtype=jnp.dtype(cfg.dtype), rngs=rngs) for _ in range(cfg.num_layers)])


class _TwoTowers(nnx.Module):
  """The CLIP image tower, a text projection and the learned logit scale; subclasses add the
  text tower and `embed_text`."""

  def __init__(self, cfg, text_width: int, *, rngs: nnx.Rngs):
    self.config = cfg
    if isinstance(cfg.vision, ModifiedResNetConfig):
      self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim, rngs=rngs)
    else:
      self.visual = CLIPVisual(cfg.vision, cfg.embed_dim, rngs=rngs)
    self.text_projection = nnx.Param(layers.INIT(rngs.params(), (text_width, cfg.embed_dim)))
    self.logit_scale = nnx.Param(jnp.array(jnp.log(1 / 0.07), jnp.float32))

  def embed_image(self, images):
    """Images [B, S, S, 3] (NHWC, CLIP-normalised) -> image embeddings [B, E], not normalised
    (HF `get_image_features`, open_clip `encode_image(normalize=False)`)."""
    return self.visual.features(images)

  def embed_text(self, input_ids, attention_mask=None):
    """Token ids [B, T] -> text embeddings [B, E], not normalised."""
    raise NotImplementedError

  # The contrastive interface every model with ITC features has (BLIP, BLIP-2, CLIP).
  def encode_image(self, images):
    """Normalised image features [B, E]."""
    return layers.l2_normalize(self.embed_image(images))

  def encode_text(self, input_ids, attention_mask=None):
    """Normalised text features [B, E]."""
    return layers.l2_normalize(self.embed_text(input_ids, attention_mask))

  def similarity(self, image_feat, text_feat):
    """Cosine [B_img, B_txt] of normalised features."""
    return image_feat @ text_feat.T

  def itc_scale(self):
    """What the cosine is multiplied by in the contrastive logits: exp(logit_scale)."""
    return jnp.exp(self.logit_scale[...])

  def after_update(self):
    """The originals clamp the learned scale at 100 after each optimiser step."""
    self.logit_scale[...] = jnp.clip(self.logit_scale[...], 0.0, jnp.log(100.0))

  def logits(self, image_embeds, text_embeds):
    """logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine, from `embed_*` outputs."""
    return self.itc_scale() * layers.l2_normalize(image_embeds) @ layers.l2_normalize(text_embeds).T

  def __call__(self, images, input_ids, attention_mask=None):
    return self.logits(self.embed_image(images), self.embed_text(input_ids, attention_mask))


class CLIP(_TwoTowers):
  """OpenAI CLIP: causal text transformer pooled at the end-of-text token."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.text.width, rngs=rngs)
    t, dtype = cfg.text, jnp.dtype(cfg.text.dtype)
    self.token_embedding = nnx.Embed(t.vocab_size, t.width, dtype=dtype, embedding_init=layers.INIT,
                                     rngs=rngs)
    self.positional_embedding = nnx.Param(layers.INIT(rngs.params(), (t.context_length, t.width)))
    self.transformer = TextTransformer(t, rngs=rngs)
    self.ln_final = layers.layer_norm(t.width, t.ln_eps, rngs=rngs, dtype=dtype)

  def embed_text(self, input_ids, attention_mask=None):
    """Token ids [B, T] (T <= context_length) -> text embeddings [B, E] (not normalised).

    Causal attention; the state at the end-of-text token is pooled (see CLIPTextConfig).
    """
    t = self.config.text
    input_ids = jnp.asarray(input_ids)
    length = input_ids.shape[1]
    if length > t.context_length:
      raise ValueError(f'text of {length} tokens is longer than the context length {t.context_length}')
    x = self.token_embedding(input_ids) + self.positional_embedding[:length].astype(jnp.dtype(t.dtype))
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    bias = layers.mask_to_bias(layers.make_attn_mask(attention_mask, jnp.ones_like(input_ids)))
    for block in self.transformer.resblocks:
      x = block(x, bias)
    x = self.ln_final(x)
    if t.eos_token_id is None:
      pool = jnp.argmax(input_ids, axis=-1)
    else:
      pool = jnp.argmax(input_ids == t.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, pool[:, None, None], axis=1)[:, 0]
    return pooled @ self.text_projection[...].astype(pooled.dtype)


@dataclasses.dataclass(frozen=True)
class ChineseCLIPConfig:
  vision: ViTConfig | ModifiedResNetConfig = ViTConfig()
  text: BertConfig = BertConfig(vocab_size=21128, add_cross_attention=False, type_vocab_size=2,
                                hidden_dropout=0.0, attention_dropout=0.0)
  embed_dim: int = 512


class ChineseCLIP(_TwoTowers):
  """Chinese-CLIP: a BERT text tower (`text_model`) read at its [CLS] state."""

  def __init__(self, cfg: ChineseCLIPConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.text.hidden_size, rngs=rngs)
    self.text_model = BertModel(cfg.text, rngs=rngs)

  def embed_text(self, input_ids, attention_mask=None):
    """Token ids [B, T] -> text embeddings [B, E] (not normalised)."""
    cls = self.text_model(input_ids, attention_mask, mode='text')[:, 0]
    return cls @ self.text_projection[...].astype(cls.dtype)
