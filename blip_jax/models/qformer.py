"""BLIP-2's Q-Former (salesforce/LAVIS `blip2_models/Qformer.py`): a BERT whose first
`num_query` positions are learned query tokens.

- Cross-attention to the image sits in every `cross_attention_freq`-th layer and is applied
  to the query positions only.
- Every layer has two FFNs: `intermediate_query` / `output_query` for queries and
  `intermediate` / `output` for text.
- Embeddings: word + position for the text, then LayerNorm over [queries; text].
- One self-attention serves the three stage-1 objectives through its mask
  (`layers.make_attn_mask(valid, mask_ar)`): ITC runs queries and text separately
  (bidirectional), ITM runs [queries; text] bidirectionally, ITG gives the queries block 0 and
  every text token its own causal block, so text sees all queries and earlier text while
  queries see only queries.

Attribute paths mirror LAVIS (`Qformer.bert.encoder.layer[i].crossattention.self.key`,
`...intermediate_query.dense`, `Qformer.cls.predictions...`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers
from blip_jax.models.bert import BertAttention, BertConfig, BertIntermediate, BertSelfOutput, OnlyMLMHead


@dataclasses.dataclass(frozen=True)
class QFormerConfig(BertConfig):
  """The MED BertConfig with BLIP-2's defaults and the Q-Former's own fields."""
  vocab_size: int = 30523  # bert-base-uncased + [DEC]
  encoder_width: int = 1408  # the image encoder's width (EVA ViT-g)
  cross_attention_freq: int = 2
  num_query_tokens: int = 32
  # Stage 2 (BLIP-2 with an LLM) drops the text side: word/position embeddings, the text FFNs
  # and the LM head.
  text_input: bool = True


class QFormerEmbeddings(nnx.Module):
  def __init__(self, cfg: BertConfig, text_input: bool, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    if text_input:
      self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                       embedding_init=layers.INIT, rngs=rngs)
      self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                           embedding_init=layers.INIT, rngs=rngs)
    self.LayerNorm = layers.layer_norm(cfg.hidden_size, cfg.ln_eps, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(cfg.hidden_dropout, deterministic=True, rngs=rngs)

  def __call__(self, query_embeds=None, input_ids=None):
    """LayerNorm([queries; word + position]) for whichever of the two is given."""
    parts = []
    if query_embeds is not None:
      parts.append(query_embeds)
    if input_ids is not None:
      text = self.word_embeddings(input_ids)
      parts.append(text + self.position_embeddings(jnp.arange(text.shape[1]))[None].astype(text.dtype))
    return self.dropout(self.LayerNorm(jnp.concatenate(parts, axis=1)))


class QFormerLayer(nnx.Module):
  def __init__(self, cfg: BertConfig, has_cross_attention: bool, text_input: bool, *, rngs: nnx.Rngs):
    self.attention = BertAttention(cfg, cfg.hidden_size, rngs=rngs)
    self.crossattention = (BertAttention(cfg, cfg.encoder_width, rngs=rngs)
                           if has_cross_attention else None)
    if text_input:
      self.intermediate = BertIntermediate(cfg, rngs=rngs)
      self.output = BertSelfOutput(cfg, cfg.intermediate_size, rngs=rngs)
    self.intermediate_query = BertIntermediate(cfg, rngs=rngs)
    self.output_query = BertSelfOutput(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x, self_bias, num_query: int, image_embeds=None, image_rows=None):
    x, _ = self.attention(x, self_bias)
    queries, text = x[:, :num_query], x[:, num_query:]
    out = []
    if num_query:
      if self.crossattention is not None:
        if image_embeds is None:
          raise ValueError('query tokens need image_embeds for the cross-attention layers')
        kv = layers.gather_rows(self.crossattention.self.key_value(image_embeds), image_rows)
        queries, _ = self.crossattention(queries, None, kv)
      out.append(self.output_query(self.intermediate_query(queries), queries))
    if text.shape[1]:
      out.append(self.output(self.intermediate(text), text))
    return jnp.concatenate(out, axis=1)


class QFormerEncoder(nnx.Module):
  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, cfg.text_input, rngs=rngs)
                           for i in range(cfg.num_layers)])


class QFormerBert(nnx.Module):
  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.embeddings = QFormerEmbeddings(cfg, cfg.text_input, rngs=rngs)
    self.encoder = QFormerEncoder(cfg, rngs=rngs)

  def __call__(self, query_embeds=None, input_ids=None, attention_mask=None, *, image_embeds=None,
               image_rows=None, causal_text: bool = False):
    """States [B, Q + T, H] of [queries; text].

    Args:
      query_embeds: [B, Q, H] query tokens, or None for text alone (ITC text).
      input_ids: [B, T] text, or None for queries alone (image features).
      attention_mask: [B, T] text validity (queries are always valid).
      image_embeds: [B, N, W] image states for the queries' cross-attention.
      image_rows: [B] ints: row i's queries attend to image `image_rows[i]` (default i).
      causal_text: ITG's mask (text causal, seeing every query) instead of bidirectional.
    """
    x = self.embeddings(query_embeds, input_ids)
    b, n = x.shape[:2]
    num_query = 0 if query_embeds is None else query_embeds.shape[1]
    valid = jnp.ones((b, num_query), jnp.int32)
    if input_ids is not None:
      text_mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
      valid = jnp.concatenate([valid, jnp.asarray(text_mask, jnp.int32)], axis=1)
    mask_ar = jnp.zeros((b, n), jnp.int32)
    if causal_text:
      mask_ar = mask_ar.at[:, num_query:].set(1)
    self_bias = layers.mask_to_bias(layers.make_attn_mask(valid, mask_ar))
    for layer in self.encoder.layer:
      x = layer(x, self_bias, num_query, image_embeds, image_rows)
    return x


class QFormer(nnx.Module):
  """LAVIS `Qformer`: the BERT (`bert`) and its LM head (`cls`) for image-grounded generation."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.bert = QFormerBert(cfg, rngs=rngs)
    self.cls = OnlyMLMHead(cfg, rngs=rngs) if cfg.text_input else None

  def lm_logits(self, hidden):
    return self.cls.predictions(hidden, self.bert.embeddings.word_embeddings).astype(jnp.float32)
