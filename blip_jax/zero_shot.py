"""Zero-shot classification with CLIP: class names x prompt templates -> a linear classifier.

    classifier = zero_shot_classifier(model, token_ids)   # token_ids [C classes, T templates, L]
    top_idx, top_prob = classify(model, images, classifier, k=5)

Each class's prompts ("a photo of a {}.", ...) are encoded, normalised and averaged, then the
mean is normalised again (OpenAI's prompt ensembling). Tokenize the prompts with the model's
own tokenizer (HF `CLIPTokenizer` from a local folder, or open_clip's bundled BPE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models.clip import CLIP
from blip_jax.models.layers import l2_normalize


def zero_shot_classifier(model: CLIP, token_ids, attention_mask=None):
  """Prompt-ensembled class embeddings [E, C] from token ids [C, T, L] (one batched pass)."""
  token_ids = jnp.asarray(token_ids)
  c, t, length = token_ids.shape
  mask = None if attention_mask is None else jnp.asarray(attention_mask).reshape(c * t, length)
  emb = l2_normalize(model.encode_text(token_ids.reshape(c * t, length), mask))
  return l2_normalize(emb.reshape(c, t, -1).mean(axis=1)).T


def classify(model: CLIP, images, classifier, k: int = 5):
  """Top-k class indices and probabilities [B, k] of `images` [B, S, S, 3].

  Probabilities are softmax(exp(logit_scale) * cosine) over all classes, as CLIP's logits.
  """
  feats = l2_normalize(model.encode_image(images))
  probs = jax.nn.softmax(jnp.exp(model.logit_scale[...]) * feats @ classifier, axis=-1)
  top_prob, top_idx = jax.lax.top_k(probs, min(k, probs.shape[-1]))
  return top_idx, top_prob
