"""BLIP task models (salesforce/BLIP `models/blip*.py`), built from the ViT and MED BERT.

| class                 | original          | use                                          |
|-----------------------|-------------------|----------------------------------------------|
| BlipFeatureExtractor  | BLIP_Base         | image / text / multimodal features           |
| BlipRetrieval         | BLIP_Retrieval/ITM| ITC features and similarity, ITM logits      |
| BlipCaptioner         | BLIP_Decoder      | captioning (prompt, teacher-forced LM)       |
| BlipVQA               | BLIP_VQA          | question encoder + answer decoder            |
| BlipNLVR              | BLIP_NLVR         | two images + statement -> true/false         |
| BlipPretrain          | BLIP_Pretrain     | ITC + ITM + LM with the tied decoder         |

First-token rules (REFERENCE.md section 3): unimodal text keeps `[CLS]`; the multimodal encoder
(ITM, VQA question, NLVR2) reads `[ENC]`; the decoder reads `[DEC]`. The models set these
tokens themselves, so callers pass plain BERT tokenizer output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax.models import gradcam, layers
from blip_jax.models.bert import BertConfig, BertLMHeadModel, BertModel, lm_loss
from blip_jax.models.vit import VisionTransformer, ViTConfig, vit_config


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  vision: ViTConfig = ViTConfig(image_size=384)
  text: BertConfig = BertConfig()
  embed_dim: int = 256  # ITC feature size (vision_proj / text_proj)
  bos_token_id: int = 30522  # [DEC]
  enc_token_id: int = 30523  # [ENC]
  pad_token_id: int = 0
  sep_token_id: int = 102  # [SEP], the decoder's end of sequence
  prompt: str = 'a picture of '
  # Training state of the contrastive models (momentum encoders and feature queues).
  with_momentum: bool = False
  queue_size: int = 57600
  momentum: float = 0.995

  def __post_init__(self):
    if self.text.encoder_width != self.vision.width:
      raise ValueError(f'text.encoder_width ({self.text.encoder_width}) must equal the ViT width '
                       f'({self.vision.width}): cross-attention reads the image tokens')


def blip_config(vit: str = 'base', image_size: int = 384, *, vision: dict | None = None,
                text: dict | None = None, **overrides) -> BlipConfig:
  """Named BLIP config: `vit` 'base' or 'large' with the MED BERT-base text side.

  `vision` / `text` hold overrides of the ViT / BERT configs, the rest of BlipConfig's fields.
  """
  vision_cfg = vit_config(vit, image_size=image_size, **(vision or {}))
  text_cfg = BertConfig(**{'encoder_width': vision_cfg.width, **(text or {})})
  return BlipConfig(vision=vision_cfg, text=text_cfg, **overrides)


def set_first_token(input_ids, token_id: int):
  return jnp.asarray(input_ids).at[:, 0].set(token_id)


class Queue(nnx.Variable):
  """Feature queues and their pointer: model state that is neither trained nor a Param."""


class _WithImageEncoder(nnx.Module):
  """Every BLIP task model: the config and the ViT `visual_encoder`."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.visual_encoder = VisionTransformer(cfg.vision, rngs=rngs)

  def image_embeds(self, images):
    """Images [B, S, S, 3] -> ViT token states [B, 1 + N, D_v]."""
    return self.visual_encoder(images)


class BlipFeatureExtractor(_WithImageEncoder):
  """BLIP_Base: the ViT and the MED encoder."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.text_encoder = BertModel(cfg.text, rngs=rngs)

  def text_embeds(self, input_ids, attention_mask=None):
    """Unimodal text states [B, T, H] (text mode, `[CLS]` kept)."""
    return self.text_encoder(input_ids, attention_mask, mode='text')

  def multimodal_embeds(self, image_embeds, input_ids, attention_mask=None, image_rows=None):
    """Image-grounded text states [B, T, H]: `[ENC]` first, cross-attention to the image
    (`image_embeds` may be a list of two for the NLVR2 encoder). `image_rows` [B]: text i reads
    image `image_rows[i]` (default i)."""
    return self.text_encoder(set_first_token(input_ids, self.config.enc_token_id), attention_mask,
                             mode='multimodal', encoder_hidden_states=image_embeds, encoder_rows=image_rows)


class BlipRetrieval(BlipFeatureExtractor):
  """ITC and ITM (BLIP_Retrieval / BLIP_ITM; HF `BlipForImageTextRetrieval`).

  With `config.with_momentum` it also holds the training state of the originals: momentum
  copies `*_m` and the feature queues.
  """

  queue_pointer_name = 'ptr_queue'
  with_idx_queue = True

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.vision_proj = layers.linear(cfg.vision.width, cfg.embed_dim, rngs=rngs)
    self.text_proj = layers.linear(cfg.text.hidden_size, cfg.embed_dim, rngs=rngs)
    self.itm_head = layers.linear(cfg.text.hidden_size, 2, rngs=rngs)
    self.temp = nnx.Param(jnp.array(0.07, jnp.float32))
    if cfg.with_momentum:
      self._init_momentum(rngs)

  def _init_momentum(self, rngs: nnx.Rngs):
    cfg = self.config
    self.visual_encoder_m = VisionTransformer(cfg.vision, rngs=rngs)
    self.vision_proj_m = layers.linear(cfg.vision.width, cfg.embed_dim, rngs=rngs)
    self.text_encoder_m = BertModel(cfg.text, rngs=rngs)
    self.text_proj_m = layers.linear(cfg.text.hidden_size, cfg.embed_dim, rngs=rngs)
    for online, momentum in self.momentum_pairs():
      nnx.update(momentum, nnx.state(online, nnx.Param))  # the originals' copy_params()
    key_i, key_t = jax.random.split(rngs.params())
    shape = (cfg.embed_dim, cfg.queue_size)
    self.image_queue = Queue(layers.l2_normalize(jax.random.normal(key_i, shape).T).T)
    self.text_queue = Queue(layers.l2_normalize(jax.random.normal(key_t, shape).T).T)
    if self.with_idx_queue:
      self.idx_queue = Queue(jnp.full((1, cfg.queue_size), -100, jnp.int32))
    setattr(self, self.queue_pointer_name, Queue(jnp.zeros((1,), jnp.int32)))
    # How many slots hold real features (written by a step, or loaded from a checkpoint). The
    # originals use the random initial slots as ITC negatives; from a random init that drives
    # ITC to a collapse it does not leave (every feature alike, measured on synthetic_scenes),
    # so slots never written are left out of the ITC softmax (tasks.itc_with_momentum).
    self.queue_filled = Queue(jnp.zeros((1,), jnp.int32))

  def momentum_pairs(self):
    return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

  def update_momentum(self):
    """p_m <- m * p_m + (1 - m) * p for every momentum pair (the originals' `_momentum_update`)."""
    m = self.config.momentum
    for online, momentum in self.momentum_pairs():
      new = jax.tree.map(lambda pm, p: m * pm + (1.0 - m) * p,
                         nnx.state(momentum, nnx.Param), nnx.state(online, nnx.Param))
      nnx.update(momentum, new)

  def image_features(self, image_embeds):
    """ITC image features [B, embed_dim]: normalize(vision_proj(CLS))."""
    return layers.l2_normalize(self.vision_proj(image_embeds[:, 0]))

  def text_features(self, text_embeds):
    """ITC text features [B, embed_dim]: normalize(text_proj(CLS))."""
    return layers.l2_normalize(self.text_proj(text_embeds[:, 0]))

  def temperature(self):
    """The learned temperature, clamped to [0.001, 0.5] as the originals do before use."""
    return jnp.clip(self.temp[...], 0.001, 0.5)

  def after_update(self):
    """The originals clamp `temp` to [0.001, 0.5] after each optimiser step."""
    self.temp[...] = jnp.clip(self.temp[...], 0.001, 0.5)

  # The contrastive interface every model with ITC features has (BLIP, BLIP-2, CLIP).
  def encode_image(self, images):
    """Normalised ITC image features [B, embed_dim] of images [B, S, S, 3]."""
    return self.image_features(self.image_embeds(images))

  def encode_text(self, input_ids, attention_mask=None):
    """Normalised ITC text features [B, embed_dim] (text mode, `[CLS]` kept)."""
    return self.text_features(self.text_embeds(input_ids, attention_mask))

  def similarity(self, image_feat, text_feat):
    """Cosine similarity [B_img, B_txt] (the ITC score used for retrieval)."""
    return image_feat @ text_feat.T

  def itc_scale(self):
    """What the cosine is multiplied by in the contrastive logits: 1 / temperature."""
    return 1.0 / self.temperature()

  def itc_logits(self, image_feat, text_feat):
    """Image-to-text logits [B_img, B_txt] of the contrastive loss: cosine / temp."""
    return self.similarity(image_feat, text_feat) / self.temperature()

  def itm_logits(self, image_embeds, input_ids, attention_mask=None, image_rows=None):
    """ITM logits [B, 2] (index 1 = match) of image-text pairs: text i with image
    `image_rows[i]` (default i)."""
    states = self.multimodal_embeds(image_embeds, input_ids, attention_mask, image_rows)
    return self.itm_head(states[:, 0]).astype(jnp.float32)

  def itm_gradcam(self, image_embeds, input_ids, attention_mask, *, layer: int = 6):
    """Grad-CAM maps [B, T + 1, g, g] and ITM logits [B, 2] of text i with image i (`models/gradcam.py`)."""
    return gradcam.itm_gradcam(self, image_embeds, input_ids, attention_mask, layer=layer)


class _Captions:
  """The captioning interface of models with an image-grounded `text_decoder` (the captioner and
  the pretraining model), shared with BLIP-2 so that one decoding routine serves them all."""

  def caption_decoder(self, image_embeds):
    """(decoder in `blip_jax.generate`'s interface, what it is conditioned on)."""
    return self.text_decoder, image_embeds

  def caption_logits(self, image_embeds, input_ids, attention_mask=None):
    """Teacher-forced logits [B, T, V] of captions that start with `[DEC]` (position t predicts
    token t + 1)."""
    return self.text_decoder(input_ids, attention_mask, image_embeds)

  def caption_token_ids(self) -> dict[str, int]:
    """The end and padding ids of generated captions (`blip_jax.generate` keywords)."""
    return {'eos_token_id': self.config.sep_token_id, 'pad_token_id': self.config.pad_token_id}


class BlipCaptioner(_Captions, _WithImageEncoder):
  """BLIP_Decoder (HF `BlipForConditionalGeneration`): the ViT and the MED decoder."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.text_decoder = BertLMHeadModel(cfg.text, rngs=rngs)

  def __call__(self, image_embeds, input_ids, attention_mask=None):
    """Teacher-forced logits [B, T, V]; the first token is replaced by `[DEC]`."""
    return self.text_decoder(set_first_token(input_ids, self.config.bos_token_id), attention_mask,
                             image_embeds)

  def loss(self, image_embeds, input_ids, attention_mask, prompt_length: int = 0):
    """Caption LM loss: pads and the first `prompt_length` tokens (the prompt) are ignored."""
    labels = jnp.where(jnp.asarray(attention_mask) == 0, -100, input_ids)
    labels = labels.at[:, :prompt_length].set(-100)
    logits = self(image_embeds, input_ids, attention_mask)
    return lm_loss(logits, labels, label_smoothing=self.config.text.label_smoothing)


class BlipVQA(BlipFeatureExtractor):
  """BLIP_VQA (HF `BlipForQuestionAnswering`): answers are decoded from the question states."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.text_decoder = BertLMHeadModel(cfg.text, rngs=rngs)

  def question_states(self, image_embeds, question_ids, question_mask=None):
    """Image-grounded question states [B, Tq, H] (`[ENC]` first)."""
    return self.multimodal_embeds(image_embeds, question_ids, question_mask)

  def answer_logits(self, question_states, question_mask, answer_ids, answer_mask=None):
    """Teacher-forced answer logits [B, Ta, V] (`[DEC]` first, cross-attention to the question)."""
    return self.text_decoder(set_first_token(answer_ids, self.config.bos_token_id), answer_mask,
                             question_states, question_mask)

  def answer_scores(self, question_states, question_mask, answer_ids, answer_mask):
    """Ranking scores [B, A] of A candidate answers ([A, Ta] ids / mask) for every question: the
    negative label-smoothed sequence loss, as the originals' `rank_answer` scores them."""
    b, a = question_states.shape[0], answer_ids.shape[0]
    return self._sequence_scores(jnp.repeat(question_states, a, 0), jnp.repeat(jnp.asarray(question_mask), a, 0),
                                 jnp.tile(answer_ids, (b, 1)), jnp.tile(answer_mask, (b, 1))).reshape(b, a)

  def rank_answers(self, question_states, question_mask, answer_ids, answer_mask, k: int = 128):
    """The best of A candidate answers for every question (indices [B]) by the originals'
    `rank_answer`: only the `k` candidates whose first token is likeliest after `[DEC]` are
    scored (`answer_scores`), so an answer outside them is never picked; all when A <= k."""
    answer_ids, answer_mask, question_mask = map(jnp.asarray, (answer_ids, answer_mask, question_mask))
    b, k = question_states.shape[0], min(k, answer_ids.shape[0])
    start = jnp.full((b, 1), self.config.bos_token_id, jnp.int32)
    first = jax.nn.softmax(self.answer_logits(question_states, question_mask, start)[:, 0].astype(jnp.float32), -1)
    _, top = jax.lax.top_k(first[:, answer_ids[:, 1]], k)  # [B, k] candidate indices
    rows = top.reshape(-1)
    scores = self._sequence_scores(jnp.repeat(question_states, k, 0), jnp.repeat(question_mask, k, 0),
                                   answer_ids[rows], answer_mask[rows])
    return jnp.take_along_axis(top, scores.reshape(b, k).argmax(-1)[:, None], 1)[:, 0]

  def _sequence_scores(self, question_states, question_mask, answer_ids, answer_mask):
    """-(label-smoothed sequence loss) [N] of answer row i given question row i."""
    logits = self.answer_logits(question_states, question_mask, answer_ids, answer_mask)
    labels = jnp.where(answer_mask == 0, -100, answer_ids)
    return -lm_loss(logits, labels, label_smoothing=self.config.text.label_smoothing, reduction='none')

  @property
  def answer_decoder(self) -> QuestionConditionedDecoder:
    """The answer decoder for `blip_jax.generate`, conditioned on `(question_states, question_mask)`."""
    return QuestionConditionedDecoder(self.text_decoder)

  def loss(self, image_embeds, question_ids, question_mask, answer_ids, answer_mask, weights):
    """Weighted answer loss `sum(w * seq_loss) / B` of the originals.

    answer_ids / answer_mask: [B, K, Ta], K candidate answers per question (pad unused slots
    and give them weight 0); weights: [B, K] (VQA soft scores).
    """
    b, k, t = answer_ids.shape
    states = self.question_states(image_embeds, question_ids, question_mask)
    states = jnp.repeat(states, k, axis=0)
    q_mask = jnp.repeat(jnp.asarray(question_mask), k, axis=0)
    a_ids, a_mask = answer_ids.reshape(b * k, t), answer_mask.reshape(b * k, t)
    logits = self.answer_logits(states, q_mask, a_ids, a_mask)
    labels = jnp.where(a_mask == 0, -100, set_first_token(a_ids, self.config.bos_token_id))
    seq_loss = lm_loss(logits, labels, label_smoothing=self.config.text.label_smoothing,
                       reduction='none')
    return (weights.reshape(-1) * seq_loss).sum() / b


class QuestionConditionedDecoder:
  """The VQA answer decoder in the decoder interface of `blip_jax.generate`: its encoder states
  are the pair (question states [B, Tq, H], question mask [B, Tq]), so padded question tokens
  stay masked in the cross-attention."""

  def __init__(self, text_decoder: BertLMHeadModel):
    self.text_decoder = text_decoder

  def init_cache(self, batch_size: int, max_length: int, question):
    states, mask = question
    return self.text_decoder.init_cache(batch_size, max_length, states, mask)

  def decode(self, input_ids, attention_mask, cache):
    return self.text_decoder.decode(input_ids, attention_mask, cache)


class BlipNLVR(BlipFeatureExtractor):
  """BLIP_NLVR: one statement, two images, a two-way classifier on the `[ENC]` state."""

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, twin_cross_attention=True))
    super().__init__(cfg, rngs=rngs)
    h = cfg.text.hidden_size
    self.cls_head = nnx.Sequential(layers.linear(h, h, rngs=rngs), jax.nn.relu,
                                   layers.linear(h, 2, rngs=rngs))

  def __call__(self, images0, images1, input_ids, attention_mask=None):
    """Logits [B, 2] (index 1 = true)."""
    b = images0.shape[0]
    image_embeds = self.visual_encoder(jnp.concatenate([images0, images1], axis=0))
    states = self.multimodal_embeds([image_embeds[:b], image_embeds[b:]], input_ids, attention_mask)
    return self.cls_head(states[:, 0]).astype(jnp.float32)


class BlipPretrain(_Captions, BlipRetrieval):
  """BLIP_Pretrain: ITC + ITM + LM. The decoder shares everything with the text encoder except
  its (causal) self-attention: embeddings, cross-attention, FFN and their LayerNorms are the
  same Variables, as `tie_encoder_decoder_weights(..., skip_key='/attention')` makes them."""

  queue_pointer_name = 'queue_ptr'
  with_idx_queue = False

  def __init__(self, cfg: BlipConfig, *, rngs: nnx.Rngs):
    # Pretraining always distils from momentum encoders and keeps feature queues.
    super().__init__(dataclasses.replace(cfg, with_momentum=True), rngs=rngs)
    self.text_decoder = BertLMHeadModel(cfg.text, rngs=rngs)
    self.text_decoder.bert.embeddings = self.text_encoder.embeddings
    for enc, dec in zip(self.text_encoder.encoder.layer, self.text_decoder.bert.encoder.layer):
      dec.crossattention = enc.crossattention
      dec.intermediate = enc.intermediate
      dec.output = enc.output

  def decoder_logits(self, image_embeds, input_ids, attention_mask=None):
    """Teacher-forced LM logits [B, T, V] of the tied decoder (`[DEC]` first)."""
    return self.text_decoder(set_first_token(input_ids, self.config.bos_token_id), attention_mask,
                             image_embeds)


TASKS = {
    'feature_extractor': BlipFeatureExtractor,
    'retrieval': BlipRetrieval,
    'caption': BlipCaptioner,
    'vqa': BlipVQA,
    'nlvr': BlipNLVR,
    'pretrain': BlipPretrain,
}
