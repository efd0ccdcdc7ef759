"""Vision Transformer encoder: BLIP's ViT-B/16 and ViT-L/16, and as variants CLIP's image
tower (no patch bias, `ln_pre`, no final norm, QuickGELU) and BLIP-2's EVA ViT-g (q/v biases
without a key bias, no final norm).

Attribute paths mirror salesforce/BLIP `models/vit.py` (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`), so a
BLIP checkpoint key maps to a parameter by a rename of the leaf alone; other families rename
their keys to these names.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  ln_eps: float = 1e-6
  act: str = 'gelu'
  patch_bias: bool = True  # CLIP's conv1 has no bias
  pre_norm: bool = False  # CLIP: LayerNorm `ln_pre` after the position embeddings
  final_norm: bool = True  # BLIP: `norm` on every output token; CLIP applies ln_post outside
  qkv_bias: str = 'qkv'  # 'qv': EVA's q_bias / v_bias without a key bias
  drop_path_rate: float = 0.0
  # Rematerialise (gradient-checkpoint) the last `remat_layers` blocks: the originals'
  # `vit_grad_ckpt=True, vit_ckpt_layer=N`.
  remat_layers: int = 0
  dtype: str = 'float32'  # compute dtype; parameters stay float32

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size {self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')


VIT_VARIANTS = {
    'base': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    'large': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, drop_path_rate=0.1),
    # EVA ViT-g as BLIP-2 uses it: 39 of its 40 blocks, no final norm (ln_vision follows).
    'eva_g': dict(width=1408, depth=39, num_heads=16, mlp_dim=6144, patch_size=14, qkv_bias='qv',
                  final_norm=False),
}


def vit_config(variant: str = 'base', **overrides) -> ViTConfig:
  """ViT config by name ('base', 'large': BLIP; 'eva_g': BLIP-2); keyword overrides win."""
  if variant not in VIT_VARIANTS:
    raise ValueError(f'unknown ViT variant {variant!r}; expected one of {sorted(VIT_VARIANTS)}')
  return ViTConfig(**{**VIT_VARIANTS[variant], **overrides})


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (rows [q; k; v]).

  `qkv_bias='qv'` is EVA's layout: no bias in `qkv`, separate `q_bias` and `v_bias`, no key bias.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: str = 'qkv', rngs: nnx.Rngs, dtype=None):
    if qkv_bias not in ('qkv', 'qv'):
      raise ValueError(f"qkv_bias must be 'qkv' or 'qv', got {qkv_bias!r}")
    self.num_heads = num_heads
    self.qkv = layers.linear(dim, 3 * dim, rngs=rngs, dtype=dtype, use_bias=qkv_bias == 'qkv')
    if qkv_bias == 'qv':
      self.q_bias = nnx.Param(jnp.zeros((dim,)))
      self.v_bias = nnx.Param(jnp.zeros((dim,)))
    self.proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype)

  def __call__(self, x, bias=None):
    qkv = self.qkv(x)
    if self.qkv.bias is None:
      qkv = qkv + jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]),
                                   self.v_bias[...]]).astype(qkv.dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k, v = (layers.split_heads(t, self.num_heads) for t in (q, k, v))
    return self.proj(layers.merge_heads(layers.dot_product_attention(q, k, v, bias)))


class Block(nnx.Module):
  """Pre-norm transformer block with stochastic depth (also CLIP's text resblock)."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, ln_eps: float, act: str,
               drop_path: float = 0.0, qkv_bias: str = 'qkv', dtype=None, rngs: nnx.Rngs):
    self.norm1 = layers.layer_norm(width, ln_eps, rngs=rngs, dtype=dtype)
    self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.norm2 = layers.layer_norm(width, ln_eps, rngs=rngs, dtype=dtype)
    self.mlp = layers.Mlp(width, mlp_dim, act, rngs=rngs, dtype=dtype)
    # Drop path = dropout of a whole sample's residual branch: one mask value per example.
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), deterministic=True, rngs=rngs)

  def __call__(self, x, bias=None):
    x = x + self.drop_path(self.attn(self.norm1(x), bias))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _run_block(block: Block, x):
  return block(x)


_run_block_remat = nnx.remat(_run_block)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches -> width, as a strided convolution."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.proj = nnx.Conv(3, cfg.width, (p, p), (p, p), padding='VALID', use_bias=cfg.patch_bias,
                         dtype=jnp.dtype(cfg.dtype), kernel_init=layers.INIT, rngs=rngs)


class VisionTransformer(nnx.Module):
  """Images [B, H, W, 3] (NHWC, normalised) -> token states [B, 1 + N, width]; CLS at index 0."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(layers.INIT(rngs.params(), (1, 1, cfg.width)))
    self.pos_embed = nnx.Param(layers.INIT(rngs.params(), (1, cfg.grid ** 2 + 1, cfg.width)))
    if cfg.pre_norm:
      self.ln_pre = layers.layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, dtype=dtype)
    # Stochastic depth grows linearly from 0 to drop_path_rate over the blocks.
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    self.blocks = nnx.List([
        Block(cfg.width, cfg.num_heads, cfg.mlp_dim, ln_eps=cfg.ln_eps, act=cfg.act, drop_path=float(r),
              qkv_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs) for r in rates])
    if cfg.final_norm:
      self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, dtype=dtype)

  def __call__(self, images):
    cfg = self.config
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f'expected images of shape [B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), '
                       f'got {tuple(images.shape)}')
    x = self.patch_embed.proj(images.astype(jnp.dtype(cfg.dtype)))
    x = x.reshape(x.shape[0], -1, cfg.width)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    if cfg.pre_norm:
      x = self.ln_pre(x)
    first_remat = cfg.depth - cfg.remat_layers
    for i, block in enumerate(self.blocks):
      x = _run_block_remat(block, x) if i >= first_remat else block(x)
    return self.norm(x) if cfg.final_norm else x


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch's bicubic interpolation (align_corners=False, a=-0.75)."""
  a = -0.75

  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5  # torch does not clamp the source index for cubic
    base = int(np.floor(src))
    frac = src - base
    for tap in range(-1, 3):
      # Out-of-range taps reuse the border pixel, as torch's upsample_bicubic2d does.
      w[i, min(max(base + tap, 0), in_size - 1)] += kernel(tap - frac)
  return w


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
  """Resize [1, prefix + g*g, D] position embeddings to a `new_grid` x `new_grid` patch grid.

  Reproduces the originals' `interpolate_pos_embed` (torch bicubic, align_corners=False);
  the class token is left untouched.
  """
  pos_embed = np.asarray(pos_embed)
  prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old_grid = int(round(grid_tokens.shape[1] ** 0.5))
  if old_grid * old_grid != grid_tokens.shape[1]:
    raise ValueError(f'position embedding has {grid_tokens.shape[1]} patch tokens, not a square grid')
  if old_grid == new_grid:
    return pos_embed
  w = _cubic_weights(old_grid, new_grid)
  grid = grid_tokens.reshape(old_grid, old_grid, -1).astype(np.float64)
  grid = np.einsum('ih,jw,hwd->ijd', w, w, grid).reshape(1, new_grid * new_grid, -1)
  return np.concatenate([prefix, grid.astype(pos_embed.dtype)], axis=1)
