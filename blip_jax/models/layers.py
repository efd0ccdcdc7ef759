"""Building blocks shared by every model family: attention, masks, MLP, initialisers.

One attention function serves self-, cross- and causal attention; masks are built from
per-token vectors (big_vision's `make_attn_mask` idea) and turned into the additive bias the
originals use.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# The originals initialise weights with (truncated) normal std 0.02 and zero biases.
INIT = jax.nn.initializers.truncated_normal(0.02)

# BERT-family additive mask value: `(1 - mask) * -10000.0` (REFERENCE.md section 1).
MASK_VALUE = -10000.0


def gelu(x):
  """Exact (erf) GELU, as in torch's `nn.GELU()`; Flax's default is the tanh form."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  """OpenAI CLIP's activation."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': gelu, 'quick_gelu': quick_gelu, 'relu': jax.nn.relu}


def linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype=None, use_bias=True) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, kernel_init=INIT, rngs=rngs)


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
  # use_fast_variance=False: compute the variance as torch does, E[(x - mean)^2].
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


def l2_normalize(x, eps=1e-12):
  """torch's F.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def split_heads(x, num_heads: int):
  """[B, T, H * D] -> [B, T, H, D]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x):
  """[B, T, H, D] -> [B, T, H * D]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class CachedKV(NamedTuple):
  """Keys/values computed once and read at every decoding step (the cross-attention to an image),
  stored heads-major: keys [B, H, D, T], values [B, H, T, D]. Those are the layouts XLA's CPU
  matmuls read directly; kept as [B, T, H, D], the keys and values of every layer were transposed
  again at every step (measured on 577 image tokens: 10x the cross-attention's own time)."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def of(cls, k, v) -> CachedKV:
    """From keys and values [B, T, H, D]."""
    return cls(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))


def dot_product_attention(q, k, v, bias=None, dropout: nnx.Dropout | None = None):
  """Softmax attention over [B, T, H, D] inputs; `bias` broadcasts to [B, H, Tq, Tk].
  The keys/values may instead come as one `CachedKV` in `k` (with `v=None`).

  The softmax runs in float32 whatever the compute dtype, so bf16 training does not lose
  the masked positions or overflow.

  Keys/values may have fewer rows than the queries: with q [B * G, Tq, H, D] and k, v
  [B, Tk, H, D], each group of G consecutive query rows reads one key/value row (the beams or
  samples of one image share its cross-attention keys/values instead of G copies). `bias` then
  broadcasts to [B, H, Tq, Tk] or [B * G, H, Tq, Tk].

  The implementation is chosen per call (`attention_path`): cuDNN's fused flash attention on
  NVIDIA GPUs in bf16 / fp16, a head at a time for large scores on CPU, the formula otherwise;
  each computes the same function.
  """
  cached = isinstance(k, CachedKV)
  if cached:
    k, v = k
  rows, groups = k.shape[0], q.shape[0] // k.shape[0]
  if groups * rows != q.shape[0]:
    raise ValueError(f'{q.shape[0]} query rows cannot share {rows} key/value rows')
  if groups > 1:
    tq = q.shape[1]
    q = q.reshape(rows, groups * tq, *q.shape[2:])
    if bias is not None and bias.ndim == 4 and bias.shape[0] == rows * groups != rows:
      bias = jnp.broadcast_to(bias, (rows * groups, bias.shape[1], tq, bias.shape[3]))
      bias = bias.reshape(rows, groups, *bias.shape[1:]).swapaxes(1, 2).reshape(rows, bias.shape[1], groups * tq, -1)
    out = dot_product_attention(q, CachedKV(k, v) if cached else k, None if cached else v, bias, dropout)
    return out.reshape(rows * groups, tq, *out.shape[2:])
  scale = q.shape[-1] ** -0.5
  path = attention_path(q, k, dropout, cached=cached)
  if path == 'cudnn':
    out = fused_attention(q, k, v, bias, scale, 'cudnn')
    if out is not None:
      return out
    path = 'xla'  # shapes or masks cuDNN does not take: the formula (recorded as such)
  PATHS_USED.add(path)
  if path == 'by_head':
    return _attention_by_head(q, k, v, bias, scale)
  logits = jnp.einsum('bqhd,bhdk->bhqk' if cached else 'bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if dropout is not None:
    probs = dropout(probs)
  if cached:  # heads-major out, then [B, Tq, H, D]: a few queries, so the transpose is small (9x faster on CPU)
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v).swapaxes(1, 2)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


# The attention paths taken by the calls traced so far (the benchmark reports them).
PATHS_USED: set[str] = set()
FLASH_DTYPES = (jnp.bfloat16, jnp.float16)


def _dropout_on(dropout) -> bool:
  return dropout is not None and not dropout.deterministic and dropout.rate > 0


def attention_path(q, k, dropout=None, *, cached: bool = False, backend: str | None = None,
                   device_kind: str | None = None) -> str:
  """Which implementation `dot_product_attention` uses:

  - 'cudnn': NVIDIA GPUs, bf16 / fp16 queries, no dropout on the probabilities (cuDNN's fused
    kernel has no such dropout), a head size that is a multiple of 8 up to 128, keys and values
    not read from a decoding cache (those are stored heads-major for the one-query steps);
  - 'by_head': CPU, scores above `HEAD_AT_A_TIME_BYTES`, no dropout (see `_attention_by_head`);
  - 'xla': the formula in one pass (TPUs, fp32 on GPUs, decoding steps, training with attention
    dropout).
  `backend` / `device_kind` default to JAX's (tests pass them to check the rule on a CPU).
  """
  backend = backend or jax.default_backend()
  if backend == 'gpu':
    kind = (device_kind or jax.devices()[0].device_kind).lower()
    nvidia = not any(name in kind for name in ('amd', 'radeon', 'instinct', 'mi2', 'mi3'))
    if (nvidia and not cached and not _dropout_on(dropout) and q.dtype in FLASH_DTYPES
        and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
      return 'cudnn'
  if backend == 'cpu' and not cached and _head_at_a_time(q, k, dropout):
    return 'by_head'
  return 'xla'


def fused_attention(q, k, v, bias, scale, implementation: str):
  """`jax.nn.dot_product_attention` with our conventions ([B, T, H, D], an additive bias that
  broadcasts to [B, H, Tq, Tk]); None when `implementation` does not take these inputs. The bias
  is given in the compute dtype (BERT's -10000 for masked keys stays a masked key)."""
  if bias is not None:
    bias = jnp.broadcast_to(jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape),
                            (q.shape[0], bias.shape[-3] if bias.ndim >= 3 else 1, q.shape[1], k.shape[1]))
    bias = bias.astype(q.dtype)
  try:
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)
  except (ValueError, NotImplementedError, TypeError):  # checked when traced, so a fallback costs nothing
    return None
  PATHS_USED.add(implementation)
  return out


# On CPU, attention whose scores [B, H, Tq, Tk] would take more than this many bytes runs one
# head at a time: a head's scores stay in cache from the first matmul through the softmax to the
# second, where the whole tensor went out to memory and back between each. Each head's
# probabilities are recomputed in the backward pass (`jax.checkpoint`) rather than kept. Measured
# on 2 cores, ViT-B/16 at 384 px, batch 8, one layer: forward 137 -> 48 ms, forward + backward
# 337 -> 140 ms, and no [8, 12, 577, 577] probabilities held for the backward pass. Heads, not
# batch rows, are the loop, because the batch axis is the one a mesh shards. GPUs and TPUs keep
# the one fused computation.
HEAD_AT_A_TIME_BYTES = 4 * 2**20


def _head_at_a_time(q, k, dropout) -> bool:
  # Dropout on the probabilities would need a random stream per head; it is on only in training.
  scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
  return not _dropout_on(dropout) and scores > HEAD_AT_A_TIME_BYTES


def _attention_by_head(q, k, v, bias, scale):
  """`dot_product_attention` (no dropout) as a loop over heads; same inputs and output."""
  if bias is not None:
    bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)  # [B or 1, H or 1, Tq or 1, Tk]
  per_head_bias = bias is not None and bias.shape[1] > 1
  shared_bias = None if bias is None or per_head_bias else bias[:, 0]

  def one_head(args):
    q, k, v, bias = args  # [B, Tq, D], [B, Tk, D], [B, Tk, D], this head's bias or None
    logits = jnp.einsum('bqd,bkd->bqk', q, k).astype(jnp.float32) * scale
    bias = shared_bias if bias is None else bias
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bqk,bkd->bqd', probs, v)

  heads_first = lambda x: x.transpose(2, 0, 1, 3)  # [B, T, H, D] -> [H, B, T, D]
  mapped_bias = bias.transpose(1, 0, 2, 3) if per_head_bias else None
  out = jax.lax.map(jax.checkpoint(one_head), (heads_first(q), heads_first(k), heads_first(v), mapped_bias))
  return out.transpose(1, 2, 0, 3)


def gather_rows(tree, rows):
  """Every array in `tree` at batch rows `rows` (None: unchanged). Pairs that share an image
  (ITM with hard negatives: 3B pairs over B images) gather its cross-attention keys/values, so
  the key/value projections run once per image, not once per pair."""
  return tree if rows is None else jax.tree.map(lambda x: x[rows], tree)


def make_attn_mask(input_mask, mask_ar):
  """Boolean [B, Tq=T, Tk=T] mask from per-token vectors (big_vision's PaliGemma rule).

  `input_mask[b, t]` is 1 for real tokens. `mask_ar[b, t]` is 1 where token t starts a new
  autoregressive block: a token attends to every valid token whose block index
  (cumsum of mask_ar) is <= its own. All zeros gives bidirectional attention, all ones causal
  attention, and a 0-prefix then ones gives prefix-LM attention. Only keys are masked, as in
  BERT: padded query rows still compute, which keeps them equal to the PyTorch outputs.
  """
  input_mask = jnp.asarray(input_mask, bool)
  blocks = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32), axis=-1)
  allowed = blocks[:, None, :] <= blocks[:, :, None]
  return allowed & input_mask[:, None, :]


def cached_causal_bias(slot_mask, index, num_new: int):
  """Bias [B, 1, T, L] for T new tokens at cache positions index..index+T-1 attending to a
  cache of L slots: earlier-or-same slots that hold real tokens (`slot_mask` [B, L])."""
  query_pos = index + jnp.arange(num_new)
  allowed = (jnp.arange(slot_mask.shape[1])[None, :] <= query_pos[:, None])[None]
  return mask_to_bias(allowed & jnp.asarray(slot_mask, bool)[:, None, :])


def mask_to_bias(mask):
  """Boolean keep-mask [B, Tk] or [B, Tq, Tk] -> additive bias broadcasting to [B, H, Tq, Tk]."""
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == 2:
    mask = mask[:, None, :]
  return (1.0 - mask[:, None, :, :]) * MASK_VALUE


class Mlp(nnx.Module):
  """fc1 -> activation -> fc2 (ViT blocks)."""

  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = linear(dim, hidden, rngs=rngs, dtype=dtype)
    self.fc2 = linear(hidden, dim, rngs=rngs, dtype=dtype)
    self.act = ACTIVATIONS[act]

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))
