"""OPT decoder (HF `OPTForCausalLM`), the frozen LLM of BLIP-2 stage 2.

Learned positions with an offset of 2 computed from the attention mask (so left padding works),
pre-LayerNorm blocks (post-LN for 350m), ReLU FFN, optional `project_in` / `project_out` when the
word-embedding width differs, an LM head tied to the token embeddings, and a static KV cache.
Attribute paths mirror HF (`model.decoder.layers[i].self_attn.q_proj`, ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  vocab_size: int = 50272
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int | None = None  # None: same as hidden_size
  do_layer_norm_before: bool = True
  enable_bias: bool = True
  act: str = 'relu'
  ln_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2
  dtype: str = 'float32'

  @property
  def embed_dim(self) -> int:
    return self.word_embed_proj_dim or self.hidden_size


OPT_VARIANTS = {
    '125m': dict(hidden_size=768, num_layers=12, num_heads=12, ffn_dim=3072),
    '350m': dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_dim=4096, word_embed_proj_dim=512,
                 do_layer_norm_before=False),
    '1.3b': dict(hidden_size=2048, num_layers=24, num_heads=32, ffn_dim=8192),
    '2.7b': dict(hidden_size=2560, num_layers=32, num_heads=32, ffn_dim=10240),
    '6.7b': dict(hidden_size=4096, num_layers=32, num_heads=32, ffn_dim=16384),
}


def opt_config(variant: str = '2.7b', **overrides) -> OPTConfig:
  if variant not in OPT_VARIANTS:
    raise ValueError(f'unknown OPT size {variant!r}; expected one of {sorted(OPT_VARIANTS)}')
  return OPTConfig(**{**OPT_VARIANTS[variant], **overrides})


class OPTAttention(nnx.Module):
  def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
    d, dtype, bias = cfg.hidden_size, jnp.dtype(cfg.dtype), cfg.enable_bias
    self.num_heads = cfg.num_heads
    self.q_proj = layers.linear(d, d, rngs=rngs, dtype=dtype, use_bias=bias)
    self.k_proj = layers.linear(d, d, rngs=rngs, dtype=dtype, use_bias=bias)
    self.v_proj = layers.linear(d, d, rngs=rngs, dtype=dtype, use_bias=bias)
    self.out_proj = layers.linear(d, d, rngs=rngs, dtype=dtype, use_bias=bias)

  def __call__(self, x, bias, cache=None, cache_index=None):
    q, k, v = (layers.split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start)
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)
      cache = {'k': k, 'v': v}
    return self.out_proj(layers.merge_heads(layers.dot_product_attention(q, k, v, bias))), cache


class OPTDecoderLayer(nnx.Module):
  def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
    d, dtype = cfg.hidden_size, jnp.dtype(cfg.dtype)
    self.pre_norm = cfg.do_layer_norm_before
    self.self_attn = OPTAttention(cfg, rngs=rngs)
    self.self_attn_layer_norm = layers.layer_norm(d, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.fc1 = layers.linear(d, cfg.ffn_dim, rngs=rngs, dtype=dtype, use_bias=cfg.enable_bias)
    self.fc2 = layers.linear(cfg.ffn_dim, d, rngs=rngs, dtype=dtype, use_bias=cfg.enable_bias)
    self.final_layer_norm = layers.layer_norm(d, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.act = layers.ACTIVATIONS[cfg.act]

  def __call__(self, x, bias, cache=None, cache_index=None):
    h = self.self_attn_layer_norm(x) if self.pre_norm else x
    h, cache = self.self_attn(h, bias, cache, cache_index)
    x = x + h
    if not self.pre_norm:
      x = self.self_attn_layer_norm(x)
    h = self.final_layer_norm(x) if self.pre_norm else x
    x = x + self.fc2(self.act(self.fc1(h)))
    if not self.pre_norm:
      x = self.final_layer_norm(x)
    return x, cache


class OPTDecoder(nnx.Module):
  POSITION_OFFSET = 2  # OPT's learned positions start at index 2

  def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, embedding_init=layers.INIT,
                                  rngs=rngs)
    self.embed_positions = nnx.Embed(cfg.max_position_embeddings + self.POSITION_OFFSET, cfg.hidden_size,
                                     dtype=dtype, embedding_init=layers.INIT, rngs=rngs)
    projected = cfg.embed_dim != cfg.hidden_size
    self.project_in = (layers.linear(cfg.embed_dim, cfg.hidden_size, rngs=rngs, dtype=dtype, use_bias=False)
                       if projected else None)
    self.project_out = (layers.linear(cfg.hidden_size, cfg.embed_dim, rngs=rngs, dtype=dtype, use_bias=False)
                        if projected else None)
    self.final_layer_norm = (layers.layer_norm(cfg.hidden_size, cfg.ln_eps, rngs=rngs, dtype=dtype)
                             if cfg.do_layer_norm_before else None)
    self.layers = nnx.List([OPTDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def run(self, inputs_embeds, positions, bias, caches=None, cache_index=None):
    x = inputs_embeds if self.project_in is None else self.project_in(inputs_embeds)
    x = x + self.embed_positions(positions + self.POSITION_OFFSET).astype(x.dtype)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, c = layer(x, bias, None if caches is None else caches[i], cache_index)
      new_caches.append(c)
    if self.final_layer_norm is not None:
      x = self.final_layer_norm(x)
    if self.project_out is not None:
      x = self.project_out(x)
    return x, new_caches


def positions_from_mask(attention_mask):
  """OPT's position ids: the running count of real tokens minus one (-1 on padding)."""
  mask = jnp.asarray(attention_mask, jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask - 1


class OPTModel(nnx.Module):
  def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
    self.decoder = OPTDecoder(cfg, rngs=rngs)


class OPTForCausalLM(nnx.Module):
  """OPT with its (tied) LM head; logits are float32."""

  def __init__(self, cfg: OPTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.model = OPTModel(cfg, rngs=rngs)

  def embed(self, input_ids):
    return self.model.decoder.embed_tokens(input_ids)

  def logits_from_hidden(self, hidden):
    return self.model.decoder.embed_tokens.attend(hidden).astype(jnp.float32)

  def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None):
    """Logits [B, T, V] (position t predicts token t + 1) of a causal pass."""
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    b, t = inputs_embeds.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    bias = layers.mask_to_bias(layers.make_attn_mask(attention_mask, jnp.ones((b, t), jnp.int32)))
    hidden, _ = self.model.decoder.run(inputs_embeds, positions_from_mask(attention_mask), bias)
    return self.logits_from_hidden(hidden)

  def init_cache(self, batch_size: int, max_length: int):
    cfg = self.config
    empty = jnp.zeros((batch_size, max_length, cfg.num_heads, cfg.hidden_size // cfg.num_heads),
                      jnp.dtype(cfg.dtype))
    return {'index': jnp.array(0, jnp.int32), 'layers': [{'k': empty, 'v': empty} for _ in range(cfg.num_layers)]}

  def decode(self, input_ids, attention_mask, cache, *, inputs_embeds=None):
    """Logits [B, T, V] of T new tokens (ids or embeddings) and the updated cache.

    `attention_mask` [B, max_length] marks the cache slots that hold real tokens (positions
    are counted from it, as OPT does).
    """
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    index, t = cache['index'], inputs_embeds.shape[1]
    positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), index, t, axis=1)
    hidden, caches = self.model.decoder.run(inputs_embeds, positions,
                                            layers.cached_causal_bias(attention_mask, index, t),
                                            cache['layers'], index)
    return self.logits_from_hidden(hidden), {'index': index + t, 'layers': caches}
