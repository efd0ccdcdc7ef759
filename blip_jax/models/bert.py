"""BLIP's "MED" BERT: one post-norm transformer used as text encoder, image-grounded encoder
and image-grounded decoder (salesforce/BLIP `models/med.py`), plus the NLVR2 variant with two
cross-attentions per layer (`models/nlvr_encoder.py`).

Modes (REFERENCE.md section 2):
- `text`: bidirectional self-attention only (ITC text features).
- `multimodal`: self-attention, then cross-attention to encoder states (image tokens, or the
  VQA question states), then the FFN (ITM, VQA question encoder, NLVR2).
- decoder (`is_decoder=True`): causal self-attention + cross-attention (captioning, VQA
  answers); `BertLMHeadModel` adds the LM head and a static KV cache for decoding in which
  the cross-attention keys/values of the encoder states are computed once.

Attribute paths mirror the PyTorch module names (`embeddings.word_embeddings`,
`encoder.layer[i].attention.self.query`, `...crossattention.output.LayerNorm`,
`cls.predictions.transform.dense`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  ln_eps: float = 1e-12
  act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  encoder_width: int = 768  # width of the states cross-attention reads (the ViT width)
  add_cross_attention: bool = True
  # NLVR2: two cross-attentions per layer (one per image); from `merge_from_layer` on their
  # outputs are concatenated and merged by a Linear(2H, H), before that they are averaged.
  twin_cross_attention: bool = False
  merge_from_layer: int = 6
  label_smoothing: float = 0.1
  # The LM head's output projection is the word-embedding matrix (BLIP ties them).
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  # BLIP's MED has no token-type embeddings; BERT proper (Chinese-CLIP's text tower) has them
  # and adds type 0 to every token.
  type_vocab_size: int = 0
  dtype: str = 'float32'

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}')


class BertEmbeddings(nnx.Module):
  """word + absolute position embeddings -> LayerNorm -> dropout (no token types in BLIP)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                     embedding_init=layers.INIT, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                         embedding_init=layers.INIT, rngs=rngs)
    if cfg.type_vocab_size:
      self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype,
                                             embedding_init=layers.INIT, rngs=rngs)
    self.type_vocab_size = cfg.type_vocab_size
    self.LayerNorm = layers.layer_norm(cfg.hidden_size, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs)

  def __call__(self, input_ids=None, inputs_embeds=None, position_offset=0):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
    if self.type_vocab_size:
      x = x + self.token_type_embeddings.embedding[0].astype(x.dtype)
    positions = position_offset + jnp.arange(x.shape[1])
    x = x + self.position_embeddings(positions)[None]
    return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nnx.Module):
  """query/key/value projections and attention; cross-attention keys/values read `kv_width`."""

  def __init__(self, cfg: BertConfig, kv_width: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.num_heads = cfg.num_heads
    self.query = layers.linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.key = layers.linear(kv_width, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.value = layers.linear(kv_width, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(cfg.attention_dropout, deterministic=True, rngs=rngs)
    # While `blip_jax.models.gradcam` reads this attention's probabilities: a callable that
    # attends in their place, (q, k, v, bias) -> out [B, T, H, D].
    self.probe = None

  def key_value(self, states):
    """Keys and values [B, T, H, D] of `states` (cached once per image for decoding)."""
    return (layers.split_heads(self.key(states), self.num_heads),
            layers.split_heads(self.value(states), self.num_heads))

  def __call__(self, hidden, bias, kv, cache=None, cache_index=None):
    """Attend from `hidden` to `kv = (k, v)`.

    With a self-attention `cache` ({'k', 'v'} of [B, max_len, H, D]), `kv` holds the new
    tokens' keys/values, which are written at `cache_index` before attending; the updated
    cache is returned alongside the output.
    """
    k, v = kv
    if isinstance(kv, layers.CachedKV):
      k, v = kv, None
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start)
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)
      cache = {'k': k, 'v': v}
    q = layers.split_heads(self.query(hidden), self.num_heads)
    attend = self.probe or (lambda q, k, v, bias: layers.dot_product_attention(q, k, v, bias, self.dropout))
    return layers.merge_heads(attend(q, k, v, bias)), cache


class BertSelfOutput(nnx.Module):
  """dense -> dropout -> LayerNorm(x + residual): the post-norm residual of BERT."""

  def __init__(self, cfg: BertConfig, din: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.dense = layers.linear(din, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.LayerNorm = layers.layer_norm(cfg.hidden_size, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs)

  def __call__(self, x, residual):
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nnx.Module):
  """Self- or cross-attention followed by its output projection and residual LayerNorm."""

  def __init__(self, cfg: BertConfig, kv_width: int, *, rngs: nnx.Rngs):
    self.self = BertSelfAttention(cfg, kv_width, rngs=rngs)
    self.output = BertSelfOutput(cfg, cfg.hidden_size, rngs=rngs)

  def __call__(self, hidden, bias, kv=None, cache=None, cache_index=None):
    """Self-attention when `kv` is None (keys from `hidden`), else attention to `kv`."""
    if kv is None:
      kv = self.self.key_value(hidden)
    out, cache = self.self(hidden, bias, kv, cache, cache_index)
    return self.output(out, hidden), cache


class TwinOutput(nnx.Module):
  """NLVR2 cross-attention output: dense0/dense1 per image, averaged or merged, then LayerNorm."""

  def __init__(self, cfg: BertConfig, merge: bool, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    h = cfg.hidden_size
    self.dense0 = layers.linear(h, h, rngs=rngs, dtype=dtype)
    self.dense1 = layers.linear(h, h, rngs=rngs, dtype=dtype)
    # The original computes `merge_layer(cat(...))` with no activation (it is commented out).
    self.merge_layer = layers.linear(2 * h, h, rngs=rngs, dtype=dtype) if merge else None
    self.LayerNorm = layers.layer_norm(h, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs)

  def __call__(self, x0, x1, residual):
    x0, x1 = self.dense0(x0), self.dense1(x1)
    if self.merge_layer is not None:
      x = self.merge_layer(jnp.concatenate([x0, x1], axis=-1))
    else:
      x = (x0 + x1) / 2
    return self.LayerNorm(self.dropout(x) + residual)


class TwinCrossAttention(nnx.Module):
  """Two cross-attentions (`self0` to image 0, `self1` to image 1) sharing one output block."""

  def __init__(self, cfg: BertConfig, merge: bool, *, rngs: nnx.Rngs):
    self.self0 = BertSelfAttention(cfg, cfg.encoder_width, rngs=rngs)
    self.self1 = BertSelfAttention(cfg, cfg.encoder_width, rngs=rngs)
    self.output = TwinOutput(cfg, merge, rngs=rngs)

  def __call__(self, hidden, biases, kvs):
    out0, _ = self.self0(hidden, biases[0], kvs[0])
    out1, _ = self.self1(hidden, biases[1], kvs[1])
    return self.output(out0, out1, hidden)


class BertLayer(nnx.Module):
  """self-attention -> (cross-attention) -> FFN, each with residual + LayerNorm."""

  def __init__(self, cfg: BertConfig, index: int, *, rngs: nnx.Rngs):
    self.attention = BertAttention(cfg, cfg.hidden_size, rngs=rngs)
    if cfg.twin_cross_attention:
      self.crossattention = TwinCrossAttention(cfg, index >= cfg.merge_from_layer, rngs=rngs)
    elif cfg.add_cross_attention:
      self.crossattention = BertAttention(cfg, cfg.encoder_width, rngs=rngs)
    else:
      self.crossattention = None
    self.intermediate = BertIntermediate(cfg, rngs=rngs)
    self.output = BertSelfOutput(cfg, cfg.intermediate_size, rngs=rngs)

  def cross_key_values(self, encoder_states: Sequence[Any], cached: bool = False):
    """Cross-attention keys/values for each encoder input; `cached`: as `layers.CachedKV`, for
    the decoding cache (computed once, read at every step)."""
    wrap = (lambda kv: layers.CachedKV.of(*kv)) if cached else (lambda kv: kv)
    if isinstance(self.crossattention, TwinCrossAttention):
      return [wrap(self.crossattention.self0.key_value(encoder_states[0])),
              wrap(self.crossattention.self1.key_value(encoder_states[1]))]
    return [wrap(self.crossattention.self.key_value(encoder_states[0]))]

  def __call__(self, x, self_bias, cross=None, cache=None, cache_index=None):
    """`cross`: None (text mode) or (list of (k, v), list of biases), one entry per image."""
    x, cache = self.attention(x, self_bias, cache=cache, cache_index=cache_index)
    if cross is not None:
      if self.crossattention is None:
        raise ValueError('multimodal mode needs a model built with add_cross_attention=True')
      kvs, biases = cross
      if isinstance(self.crossattention, TwinCrossAttention):
        x = self.crossattention(x, biases, kvs)
      else:
        x, _ = self.crossattention(x, biases[0], kvs[0])
    return self.output(self.intermediate(x), x), cache


class BertIntermediate(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dense = layers.linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs,
                               dtype=jnp.dtype(cfg.dtype))
    self.act = layers.ACTIVATIONS[cfg.act]

  def __call__(self, x):
    return self.act(self.dense(x))


class BertEncoder(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([BertLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])


def _as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


class BertModel(nnx.Module):
  """The MED transformer without a head; returns the last hidden states [B, T, H]."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.encoder = BertEncoder(cfg, rngs=rngs)

  def _cross_inputs(self, encoder_hidden_states, encoder_attention_mask):
    states = _as_list(encoder_hidden_states)
    masks = (_as_list(encoder_attention_mask) if encoder_attention_mask is not None
             else [None] * len(states))
    biases = [None if m is None else layers.mask_to_bias(m) for m in masks]
    return states, biases

  def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, mode='text',
               encoder_hidden_states=None, encoder_attention_mask=None, encoder_rows=None,
               is_decoder=False):
    """Run the encoder.

    Args:
      input_ids: [B, T] token ids (or pass `inputs_embeds` [B, T, H] instead).
      attention_mask: [B, T], 1 for real tokens; defaults to all ones.
      mode: 'text' (no cross-attention) or 'multimodal' (cross-attention to
        `encoder_hidden_states`: one [B, N, W] array, or two for the NLVR2 encoder).
      encoder_attention_mask: [B, N] (or one per image), 1 for states to attend to; default all.
      encoder_rows: [B] ints: text row i attends to encoder row `encoder_rows[i]` (default i), so
        the encoder inputs may have fewer rows than the text (see `layers.gather_rows`).
      is_decoder: causal self-attention (the decoder's mode).
    """
    if mode not in ('text', 'multimodal'):
      raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
    if mode == 'multimodal' and encoder_hidden_states is None:
      raise ValueError("mode='multimodal' needs encoder_hidden_states")
    x = self.embeddings(input_ids, inputs_embeds)
    if attention_mask is None:
      attention_mask = jnp.ones(x.shape[:2], jnp.int32)
    mask_ar = jnp.full(x.shape[:2], int(is_decoder), jnp.int32)
    self_bias = layers.mask_to_bias(layers.make_attn_mask(attention_mask, mask_ar))
    cross_states, cross_biases = (None, None)
    if mode == 'multimodal':
      cross_states, cross_biases = self._cross_inputs(encoder_hidden_states, encoder_attention_mask)
      cross_biases = layers.gather_rows(cross_biases, encoder_rows)
    for layer in self.encoder.layer:
      cross = None
      if cross_states is not None:
        cross = (layers.gather_rows(layer.cross_key_values(cross_states), encoder_rows), cross_biases)
      x, _ = layer(x, self_bias, cross)
    return x

  # --- incremental decoding -------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states,
                 encoder_attention_mask=None, dtype=None):
    """A decoding cache: empty self-attention keys/values for `max_length` tokens of
    `batch_size` rows, and under `'shared'` the cross-attention keys/values of
    `encoder_hidden_states`, computed here once.

    The encoder states may have fewer rows than `batch_size` (a divisor of it): then each
    group of `batch_size // rows` consecutive sequences (the beams of one image) reads the same
    row of cross-attention keys/values. `blip_jax.generate` never reorders or repeats
    `cache['shared']`.
    """
    cfg = self.config
    dtype = dtype or jnp.dtype(cfg.dtype)
    states, biases = self._cross_inputs(encoder_hidden_states, encoder_attention_mask)
    if batch_size % states[0].shape[0]:
      raise ValueError(f'{batch_size} sequences cannot share the cross-attention of {states[0].shape[0]} rows')
    head_dim = cfg.hidden_size // cfg.num_heads
    empty = jnp.zeros((batch_size, max_length, cfg.num_heads, head_dim), dtype)
    return {
        'index': jnp.array(0, jnp.int32),
        'layers': [{'k': empty, 'v': empty} for _ in self.encoder.layer],
        'shared': {'cross_bias': biases,
                   'cross_kv': [layer.cross_key_values(states, cached=True) for layer in self.encoder.layer]},
    }

  def decode(self, input_ids, attention_mask, cache, inputs_embeds=None):
    """Run T new tokens through the decoder, reading and extending `cache`.

    Args:
      input_ids: [B, T] the next tokens (their positions continue from `cache['index']`).
      attention_mask: [B, max_length], 1 for cache slots that hold real tokens; slots after
        the current ones are ignored by the causal rule whatever their value.
    Returns:
      hidden states [B, T, H] and the updated cache.
    """
    index, shared = cache['index'], cache['shared']
    x = self.embeddings(input_ids, inputs_embeds, position_offset=index)
    self_bias = layers.cached_causal_bias(attention_mask, index, x.shape[1])
    new_layers = []
    for layer, kv_cache, cross_kv in zip(self.encoder.layer, cache['layers'], shared['cross_kv']):
      x, kv_cache = layer(x, self_bias, (cross_kv, shared['cross_bias']), cache=kv_cache, cache_index=index)
      new_layers.append(kv_cache)
    return x, {**cache, 'index': index + x.shape[1], 'layers': new_layers}


class PredictionHeadTransform(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.dense = layers.linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
    self.LayerNorm = layers.layer_norm(cfg.hidden_size, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.act = layers.ACTIVATIONS[cfg.act]

  def __call__(self, x):
    return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nnx.Module):
  """dense -> gelu -> LayerNorm -> vocabulary projection (+ bias)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.transform = PredictionHeadTransform(cfg, rngs=rngs)
    self.decoder = (None if cfg.tie_word_embeddings else
                    layers.linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs, use_bias=False,
                                  dtype=jnp.dtype(cfg.dtype)))
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,)))

  def __call__(self, x, word_embeddings: nnx.Embed):
    x = self.transform(x)
    if self.decoder is None:
      x = word_embeddings.attend(x)  # x @ E^T with the (tied) word-embedding matrix
    else:
      x = self.decoder(x)
    return x + self.bias[...].astype(x.dtype)


class OnlyMLMHead(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.predictions = LMPredictionHead(cfg, rngs=rngs)


class BertLMHeadModel(nnx.Module):
  """The MED decoder: causal BERT with cross-attention and the LM head (`text_decoder`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.bert = BertModel(cfg, rngs=rngs)
    self.cls = OnlyMLMHead(cfg, rngs=rngs)

  def logits_from_hidden(self, hidden):
    return self.cls.predictions(hidden, self.bert.embeddings.word_embeddings).astype(jnp.float32)

  def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
               encoder_attention_mask=None, *, inputs_embeds=None):
    """Teacher-forced logits [B, T, V] (float32); position t predicts token t + 1."""
    hidden = self.bert(input_ids, attention_mask, inputs_embeds=inputs_embeds, mode='multimodal',
                       encoder_hidden_states=encoder_hidden_states,
                       encoder_attention_mask=encoder_attention_mask, is_decoder=True)
    return self.logits_from_hidden(hidden)

  def init_cache(self, batch_size, max_length, encoder_hidden_states, encoder_attention_mask=None):
    return self.bert.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)

  def decode(self, input_ids, attention_mask, cache):
    """Logits [B, T, V] of T new tokens and the updated cache (see `BertModel.decode`)."""
    hidden, cache = self.bert.decode(input_ids, attention_mask, cache)
    return self.logits_from_hidden(hidden), cache


def lm_loss(logits, labels, *, label_smoothing: float = 0.1, reduction: str = 'mean'):
  """Next-token cross-entropy of MED's LM head, exactly as `BertLMHeadModel.forward`.

  `logits` [B, T, V] are shifted against `labels` [B, T] (position t predicts t + 1); labels
  of -100 are ignored. The smoothed loss per token is
  `(1 - eps) * nll + eps * mean_v(-log p_v)` (torch's `label_smoothing`).
  reduction='mean': mean over non-ignored tokens; 'none': per-sequence sums [B] (the
  originals' VQA and ranking use).
  """
  if reduction not in ('mean', 'none'):
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = labels[:, 1:]
  valid = targets != -100
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  per_token = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  per_token = jnp.where(valid, per_token, 0.0)
  if reduction == 'none':
    return per_token.sum(axis=1)
  return per_token.sum() / jnp.maximum(valid.sum(), 1)
