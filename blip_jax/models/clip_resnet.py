"""CLIP's ResNet image tower (OpenAI `ModifiedResNet`: RN50, RN101, RN50x4, RN50x16, RN50x64).

It differs from a torchvision ResNet in three places, all kept here:
- a stem of three 3x3 convolutions (the first strided) and a 2x2 average pool, not one 7x7
  convolution and a max pool;
- "anti-aliased" strides: a strided bottleneck keeps its convolutions at stride 1 and average-pools
  (kernel = stride) before `conv3`, and its shortcut average-pools before the 1x1 convolution;
- attention pooling instead of global average pooling: the mean of the final feature map is
  prepended as a query token, a positional embedding is added, and one multi-head attention from
  that token over all of them gives the embedding (`c_proj` maps it to the embedding size).

Module and weight names follow OpenAI's (`conv1`, `bn1`, `layer3.5.downsample.0`,
`attnpool.q_proj`, ...), so the checkpoints' keys map one to one. BatchNorm uses the stored
running statistics (PyTorch's eval mode): the released models are used frozen, and fine-tuning
keeps the statistics (the affine weights train).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig:
  layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottlenecks per stage
  width: int = 64  # stem width; stage i has width * 2**i planes and 4x as many output channels
  image_size: int = 224
  heads: int | None = None  # attention-pooling heads; None: width * 32 // 64, as OpenAI's build_model
  bn_eps: float = 1e-5
  dtype: str = 'float32'  # compute dtype; parameters stay float32

  @property
  def embed_width(self) -> int:
    """Channels of the last stage (the attention pool's width)."""
    return self.width * 32

  @property
  def num_heads(self) -> int:
    return self.heads or self.embed_width // 64

  @property
  def grid(self) -> int:
    return self.image_size // 32

  def __post_init__(self):
    if len(self.layers) != 4 or min(self.layers) < 1:
      raise ValueError(f'layers must be four positive block counts, got {self.layers}')
    if self.image_size % 32:
      raise ValueError(f'image_size {self.image_size} is not a multiple of 32 (the ResNet downsamples 32x)')
    if self.embed_width % self.num_heads:
      raise ValueError(f'the attention pool width {self.embed_width} is not divisible by heads {self.num_heads}')


class BatchNorm(nnx.Module):
  """BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

  def __init__(self, channels: int, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.running_mean = nnx.BatchStat(jnp.zeros((channels,)))
    self.running_var = nnx.BatchStat(jnp.ones((channels,)))

  def __call__(self, x):
    inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.scale[...]
    return (x - self.running_mean[...].astype(x.dtype)) * inv.astype(x.dtype) + self.bias[...].astype(x.dtype)


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  pad = kernel // 2  # PyTorch's symmetric padding (XLA's 'SAME' pads a strided even input on one side only)
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                  dtype=dtype, kernel_init=layers.INIT, rngs=rngs)


def _avg_pool(x, size: int):
  return x if size == 1 else nnx.avg_pool(x, (size, size), strides=(size, size), padding='VALID')


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, cfg: ModifiedResNetConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.stride = stride
    self.conv1 = _conv(cin, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, cfg.bn_eps)
    self.conv2 = _conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes, cfg.bn_eps)
    self.conv3 = _conv(planes, planes * self.expansion, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(planes * self.expansion, cfg.bn_eps)
    # OpenAI's Sequential('-1': AvgPool2d, '0': conv, '1': bn): the pool has no weights, so the
    # list holds the other two under their checkpoint indices.
    needed = stride > 1 or cin != planes * self.expansion
    self.downsample = nnx.List([_conv(cin, planes * self.expansion, 1, dtype=dtype, rngs=rngs),
                                BatchNorm(planes * self.expansion, cfg.bn_eps)]) if needed else None

  def __call__(self, x):
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(_avg_pool(out, self.stride)))
    identity = x
    if self.downsample is not None:
      conv, bn = self.downsample
      identity = bn(conv(_avg_pool(x, self.stride)))
    return jax.nn.relu(out + identity)


class AttentionPool2d(nnx.Module):
  """Multi-head attention from the mean feature over [mean; features] + positional embedding."""

  def __init__(self, grid: int, width: int, num_heads: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.positional_embedding = nnx.Param(layers.INIT(rngs.params(), (grid * grid + 1, width)))
    self.q_proj = layers.linear(width, width, rngs=rngs, dtype=dtype)
    self.k_proj = layers.linear(width, width, rngs=rngs, dtype=dtype)
    self.v_proj = layers.linear(width, width, rngs=rngs, dtype=dtype)
    self.c_proj = layers.linear(width, out_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, H*W, C]
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    x = x + self.positional_embedding[...].astype(x.dtype)
    q, k, v = (layers.split_heads(proj(t), self.num_heads)
               for proj, t in ((self.q_proj, x[:, :1]), (self.k_proj, x), (self.v_proj, x)))
    return self.c_proj(layers.merge_heads(layers.dot_product_attention(q, k, v)))[:, 0]


class ModifiedResNet(nnx.Module):
  """Images [B, S, S, 3] (NHWC, CLIP-normalised) -> image embeddings [B, out_dim] (not normalised)."""

  def __init__(self, cfg: ModifiedResNetConfig, out_dim: int, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = jnp.dtype(cfg.dtype)
    w = cfg.width
    self.conv1 = _conv(3, w // 2, 3, stride=2, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(w // 2, cfg.bn_eps)
    self.conv2 = _conv(w // 2, w // 2, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(w // 2, cfg.bn_eps)
    self.conv3 = _conv(w // 2, w, 3, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(w, cfg.bn_eps)
    cin = w
    for stage, blocks in enumerate(cfg.layers):
      planes = w * 2 ** stage
      stage_blocks = []
      for i in range(blocks):
        stage_blocks.append(Bottleneck(cin, planes, 2 if stage and not i else 1, cfg, rngs=rngs))
        cin = planes * Bottleneck.expansion
      setattr(self, f'layer{stage + 1}', nnx.List(stage_blocks))
    self.attnpool = AttentionPool2d(cfg.grid, cfg.embed_width, cfg.num_heads, out_dim, dtype=dtype, rngs=rngs)

  def features(self, images):
    cfg = self.config
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f'expected images of shape [B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), '
                       f'got {tuple(images.shape)}')
    x = images.astype(jnp.dtype(cfg.dtype))
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = jax.nn.relu(bn(conv(x)))
    x = _avg_pool(x, 2)
    for stage in range(1, 5):
      for block in getattr(self, f'layer{stage}'):
        x = block(x)
    return self.attnpool(x)
