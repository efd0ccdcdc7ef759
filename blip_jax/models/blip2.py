"""BLIP-2: a frozen image encoder, `ln_vision`, 32 learned query tokens read by the Q-Former;
stage 1 (LAVIS `Blip2Qformer`; HF `Blip2ForImageTextRetrieval`) adds the ITC / ITM / ITG heads,
stage 2 (LAVIS `Blip2OPT`; HF `Blip2ForConditionalGeneration`) feeds the projected query
outputs to a frozen OPT as a prefix of the text.

- image features: the 32 query outputs, projected and normalised ([B, 32, E]);
- ITC similarity of an image and a text: the max over its queries of the cosine with the
  text's [CLS] feature;
- ITM logit: the mean over the query positions of `itm_head` after bidirectional attention
  over [queries; text];
- ITG: text attends to all queries and to earlier text (the LM head of `Qformer.cls`);
- stage 2: OPT over [opt_proj(query outputs); text embeddings], LM loss on the text only.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from blip_jax.models import layers
from blip_jax.models.bert import lm_loss
from blip_jax.models.opt import OPTConfig, OPTForCausalLM
from blip_jax.models.qformer import QFormer, QFormerConfig
from blip_jax.models.vit import VisionTransformer, ViTConfig, vit_config


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  vision: ViTConfig = vit_config('eva_g', image_size=224)
  qformer: QFormerConfig = QFormerConfig()
  ln_vision_eps: float = 1e-5  # LAVIS; HF checkpoints carry their own value
  embed_dim: int = 256
  bos_token_id: int = 30522  # [DEC]: first token of the ITG decoder input
  pad_token_id: int = 0
  sep_token_id: int = 102  # [SEP]: where the ITG decoder's captions end
  opt: OPTConfig | None = None  # set for stage 2
  prompt: str = ''  # what captions continue (LAVIS captions without one)
  vqa_prompt: str = 'Question: {} Short answer:'  # LAVIS Blip2OPT.predict_answers

  def __post_init__(self):
    if self.qformer.encoder_width != self.vision.width:
      raise ValueError(f'qformer.encoder_width ({self.qformer.encoder_width}) must equal the '
                       f'image encoder width ({self.vision.width})')


class _Blip2Base(nnx.Module):
  """What both stages share: image encoder, ln_vision, query tokens, Q-Former."""

  def __init__(self, cfg: Blip2Config, *, rngs: nnx.Rngs):
    self.config = cfg
    q = cfg.qformer
    self.visual_encoder = VisionTransformer(cfg.vision, rngs=rngs)
    self.ln_vision = layers.layer_norm(cfg.vision.width, cfg.ln_vision_eps, rngs=rngs)
    self.query_tokens = nnx.Param(layers.INIT(rngs.params(), (1, q.num_query_tokens, q.hidden_size)))
    self.Qformer = QFormer(q, rngs=rngs)

  def image_embeds(self, images):
    """Images [B, S, S, 3] -> ln_vision(image encoder states) [B, 1 + N, W]."""
    return self.ln_vision(self.visual_encoder(images))

  def _queries(self, batch: int):
    return jnp.broadcast_to(self.query_tokens[...], (batch, *self.query_tokens.shape[1:]))

  def query_states(self, image_embeds):
    """The Q-Former's query outputs [B, Q, H]."""
    return self.Qformer.bert(self._queries(image_embeds.shape[0]), image_embeds=image_embeds)


class Blip2Qformer(_Blip2Base):
  """BLIP-2 stage 1."""

  def __init__(self, cfg: Blip2Config, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    q = cfg.qformer
    self.vision_proj = layers.linear(q.hidden_size, cfg.embed_dim, rngs=rngs)
    self.text_proj = layers.linear(q.hidden_size, cfg.embed_dim, rngs=rngs)
    self.itm_head = layers.linear(q.hidden_size, 2, rngs=rngs)
    self.temp = nnx.Param(jnp.array(0.07, jnp.float32))

  def image_features(self, image_embeds):
    """ITC image features [B, Q, E]: normalize(vision_proj(query states))."""
    return layers.l2_normalize(self.vision_proj(self.query_states(image_embeds)))

  def text_features(self, input_ids, attention_mask=None):
    """ITC text features [B, E]: normalize(text_proj([CLS] state of the text alone))."""
    states = self.Qformer.bert(input_ids=input_ids, attention_mask=attention_mask)
    return layers.l2_normalize(self.text_proj(states[:, 0]))

  # The contrastive interface every model with ITC features has (BLIP, BLIP-2, CLIP).
  def encode_image(self, images):
    """Normalised ITC image features [B, Q, E], one per query."""
    return self.image_features(self.image_embeds(images))

  def encode_text(self, input_ids, attention_mask=None):
    """Normalised ITC text features [B, E]."""
    return self.text_features(input_ids, attention_mask)

  def similarity(self, image_feat, text_feat):
    """ITC similarity [B_img, B_txt]: max over the queries of the cosine."""
    return jnp.einsum('iqe,te->iqt', image_feat, text_feat).max(axis=1)

  def itc_scale(self):
    """What the similarity is multiplied by in the contrastive logits: 1 / temp (LAVIS's BLIP-2
    uses its temperature unclamped, unlike BLIP)."""
    return 1.0 / self.temp[...]

  def caption_decoder(self, image_embeds):
    """The ITG captioner: (decoder for `blip_jax.generate`, its conditioning)."""
    return self.decoder, image_embeds

  def caption_logits(self, image_embeds, input_ids, attention_mask=None):
    """Teacher-forced ITG logits [B, T, V] of captions starting with `[DEC]`."""
    return self.itg_logits(image_embeds, input_ids, attention_mask)

  def caption_token_ids(self) -> dict[str, int]:
    return {'eos_token_id': self.config.sep_token_id, 'pad_token_id': self.config.pad_token_id}

  def itm_logits(self, image_embeds, input_ids, attention_mask=None, image_rows=None):
    """ITM logits [B, 2] of image-text pairs: itm_head averaged over the query positions; text
    i with image `image_rows[i]` (default i)."""
    queries = self._queries(input_ids.shape[0])
    states = self.Qformer.bert(queries, input_ids, attention_mask, image_embeds=image_embeds,
                               image_rows=image_rows)
    return self.itm_head(states[:, :queries.shape[1]]).mean(axis=1).astype(jnp.float32)

  def itg_logits(self, image_embeds, input_ids, attention_mask=None):
    """Image-grounded text generation logits [B, T, V] (`[DEC]` first): text attends to all
    queries and to earlier text."""
    queries = self._queries(image_embeds.shape[0])
    ids = jnp.asarray(input_ids).at[:, 0].set(self.config.bos_token_id)
    states = self.Qformer.bert(queries, ids, attention_mask, image_embeds=image_embeds,
                               causal_text=True)
    return self.Qformer.lm_logits(states[:, queries.shape[1]:])

  @property
  def decoder(self) -> QFormerDecoder:
    """The Q-Former as an image-grounded text decoder (ITG) for `blip_jax.generate`, conditioned
    on `image_embeds(...)`; its prompts start with `[DEC]` (`config.bos_token_id`)."""
    return QFormerDecoder(self)

  def itg_loss(self, image_embeds, input_ids, attention_mask):
    """ITG loss: label-smoothed LM loss on the text, pads ignored."""
    labels = jnp.where(jnp.asarray(attention_mask) == 0, -100, input_ids)
    logits = self.itg_logits(image_embeds, input_ids, attention_mask)
    return lm_loss(logits, labels, label_smoothing=self.config.qformer.label_smoothing)


class Blip2OPT(_Blip2Base):
  """BLIP-2 stage 2 with OPT: query outputs -> `opt_proj` -> prefix of the frozen `opt_model`."""

  def __init__(self, cfg: Blip2Config, *, rngs: nnx.Rngs):
    if cfg.opt is None:
      raise ValueError('Blip2OPT needs Blip2Config.opt')
    super().__init__(cfg, rngs=rngs)
    self.opt_proj = layers.linear(cfg.qformer.hidden_size, cfg.opt.embed_dim, rngs=rngs)
    self.opt_model = OPTForCausalLM(cfg.opt, rngs=rngs)

  def prefix(self, image_embeds):
    """The LLM input of an image: opt_proj(query outputs) [B, Q, D]."""
    return self.opt_proj(self.query_states(image_embeds))

  def logits(self, image_embeds, input_ids, attention_mask=None):
    """OPT logits [B, Q + T, V] over [image prefix; text] (position t predicts t + 1)."""
    prefix = self.prefix(image_embeds)
    text = self.opt_model.embed(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(text.shape[:2], jnp.int32)
    mask = jnp.concatenate([jnp.ones(prefix.shape[:2], jnp.int32), jnp.asarray(attention_mask, jnp.int32)], 1)
    return self.opt_model(attention_mask=mask, inputs_embeds=jnp.concatenate([prefix, text.astype(prefix.dtype)], 1))

  def loss(self, image_embeds, input_ids, attention_mask, prompt_length: int = 0):
    """LM loss on the text only (no smoothing), as LAVIS `Blip2OPT`: the image prefix, padding
    and the first `prompt_length` text tokens are ignored; LAVIS counts the tokenizer's BOS in
    the prompt length, so with an empty prompt `prompt_length=1`."""
    logits = self.logits(image_embeds, input_ids, attention_mask)
    labels = jnp.where(jnp.asarray(attention_mask) == 0, -100, input_ids).at[:, :prompt_length].set(-100)
    labels = jnp.concatenate([jnp.full((labels.shape[0], self.config.qformer.num_query_tokens), -100), labels], 1)
    return lm_loss(logits, labels, label_smoothing=0.0)

  @property
  def decoder(self) -> PrefixDecoder:
    """The OPT behind the image prefix, for `blip_jax.generate` (conditioned on `prefix(...)`)."""
    return PrefixDecoder(self.opt_model)

  def caption_decoder(self, image_embeds):
    """(the OPT decoder for `blip_jax.generate`, the image prefix it is conditioned on)."""
    return self.decoder, self.prefix(image_embeds)

  def caption_logits(self, image_embeds, input_ids, attention_mask=None):
    """Teacher-forced logits [B, T, V] of the text (the image prefix's positions left out)."""
    return self.logits(image_embeds, input_ids, attention_mask)[:, self.config.qformer.num_query_tokens:]

  def caption_token_ids(self) -> dict[str, int]:
    """OPT's end and padding ids; BLIP-2 checkpoints set OPT's end to '\\n' (50118), where LAVIS's
    captions end."""
    return {'eos_token_id': self.config.opt.eos_token_id, 'pad_token_id': self.config.opt.pad_token_id}


class PrefixDecoder:
  """OPT with an embedding prefix, in the decoder interface of `blip_jax.generate`.

  `init_cache(batch, max_length, prefix)` runs OPT over the prefix [B, Q, D] once and keeps its
  keys/values in front of `max_length` slots for the text; `decode` sees text tokens only, so
  ids, lengths and the repetition penalty count the text (BOS and prompt included), as BLIP's do.
  """

  def __init__(self, opt_model: OPTForCausalLM):
    self.opt_model = opt_model

  def init_cache(self, batch_size: int, max_length: int, prefix):
    prefix_length = prefix.shape[1]
    cache = self.opt_model.init_cache(batch_size, prefix_length + max_length)
    _, cache = self.opt_model.decode(None, jnp.ones((batch_size, prefix_length + max_length), jnp.int32), cache,
                                     inputs_embeds=prefix)
    return cache

  def decode(self, input_ids, attention_mask, cache):
    prefix_length = cache['layers'][0]['k'].shape[1] - attention_mask.shape[1]
    mask = jnp.concatenate([jnp.ones((attention_mask.shape[0], prefix_length), attention_mask.dtype),
                            attention_mask], axis=1)
    return self.opt_model.decode(input_ids, mask, cache)


class QFormerDecoder:
  """Blip2Qformer's ITG captioner in the decoder interface of `blip_jax.generate`.

  Under the ITG mask the queries see only queries, so their keys/values in every layer do not
  depend on the text: `init_cache` runs the queries (with their cross-attention to the image)
  once and keeps those keys/values in front of `max_length` text slots. `decode` then runs text
  tokens only (self-attention over the queries and earlier text, the text FFN), exactly what
  `itg_logits` computes for the whole text at once.
  """

  def __init__(self, model: Blip2Qformer):
    self.model = model
    self.bert = model.Qformer.bert

  def init_cache(self, batch_size: int, max_length: int, image_embeds):
    queries = self.bert.embeddings(self.model._queries(batch_size))
    num_query = queries.shape[1]
    bias = layers.mask_to_bias(jnp.ones((batch_size, num_query), bool))
    cached = []
    for layer in self.bert.encoder.layer:
      k, v = layer.attention.self.key_value(queries)
      slots = jnp.zeros((batch_size, max_length, *k.shape[2:]), k.dtype)
      cached.append({'k': jnp.concatenate([k, slots], 1), 'v': jnp.concatenate([v, slots], 1)})
      queries = layer(queries, bias, num_query, image_embeds)
    return {'index': jnp.array(0, jnp.int32), 'layers': cached}

  def decode(self, input_ids, attention_mask, cache):
    """Logits [B, T, V] of T new text tokens and the updated cache; `attention_mask` [B, max_length]
    marks the text slots holding real tokens."""
    index = cache['index']
    num_query = cache['layers'][0]['k'].shape[1] - attention_mask.shape[1]
    emb = self.bert.embeddings
    text = emb.word_embeddings(input_ids)
    x = emb.LayerNorm(text + emb.position_embeddings(index + jnp.arange(text.shape[1]))[None].astype(text.dtype))
    slots = jnp.concatenate([jnp.ones((attention_mask.shape[0], num_query), attention_mask.dtype), attention_mask], 1)
    bias = layers.cached_causal_bias(slots, num_query + index, x.shape[1])
    new_layers = []
    for layer, layer_cache in zip(self.bert.encoder.layer, cache['layers']):
      x, layer_cache = layer.attention(x, bias, cache=layer_cache, cache_index=num_query + index)
      x = layer.output(layer.intermediate(x), x)
      new_layers.append(layer_cache)
    return self.model.Qformer.lm_logits(x), {'index': index + x.shape[1], 'layers': new_layers}
