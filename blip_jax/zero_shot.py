"""Zero-shot classification: class names x prompt templates -> a linear classifier, for any model
with contrastive features (`encode_image`, `encode_text`, `similarity`, `itc_scale`: CLIP, BLIP
retrieval / pretraining, BLIP-2 stage 1).

    ids, mask = tokenize_prompts(tokenizer, class_names, templates, context_length=77)
    classifier = zero_shot_classifier(model, ids, mask)   # ids [C classes, T templates, L]
    top_idx, top_prob = classify(model, images, classifier, k=5)

Each class's prompts ("a photo of a {}.", ...) are encoded, normalised and averaged, then the
mean is normalised again (OpenAI's prompt ensembling). Tokenize the prompts with the model's
own tokenizer: any HF tokenizer object, e.g. `CLIPTokenizer.from_pretrained(local_folder)` for
CLIP (a folder with `vocab.json` and `merges.txt`) or `BertTokenizer` for Chinese-CLIP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models.layers import l2_normalize


def check_templates(templates, where: str = 'templates') -> None:
  if not templates:
    raise ValueError(f'{where}: zero-shot classification needs at least one prompt template')
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise ValueError(f'{where} must contain "{{}}" where the class name goes: {bad}')


def tokenize_prompts(tokenizer, class_names, templates, context_length: int = 77):
  """Token ids and mask [C, T, L] of every `template.format(name)`, padded to `context_length`
  (static shapes: one compilation for any number of classes of the same count)."""
  if not class_names:
    raise ValueError('zero-shot classification needs at least one class name')
  check_templates(templates)
  texts = [t.format(name) for name in class_names for t in templates]
  enc = tokenizer(texts, padding='max_length', truncation=True, max_length=context_length,
                  return_tensors='np')
  shape = (len(class_names), len(templates), context_length)
  return enc['input_ids'].reshape(shape), enc['attention_mask'].reshape(shape)


def ensemble_prompts(features):
  """OpenAI's prompt ensembling: text features [C, T, E] of T prompts per class -> normalise each,
  average per class, normalise again -> class embeddings [C, E]."""
  return l2_normalize(l2_normalize(features).mean(axis=1))


def zero_shot_classifier(model, token_ids, attention_mask=None):
  """Prompt-ensembled class embeddings [E, C] (open_clip's layout) from token ids [C, T, L]
  (one batched pass)."""
  token_ids = jnp.asarray(token_ids)
  c, t, length = token_ids.shape
  mask = None if attention_mask is None else jnp.asarray(attention_mask).reshape(c * t, length)
  return ensemble_prompts(model.encode_text(token_ids.reshape(c * t, length), mask).reshape(c, t, -1)).T


def classify(model, images, classifier, k: int = 5):
  """Top-k class indices and probabilities [B, k] of `images` [B, S, S, 3].

  Probabilities are softmax(itc_scale * similarity) over all classes, as the contrastive logits
  (CLIP: exp(logit_scale) * cosine; BLIP: cosine / temp; BLIP-2: the best query's).
  """
  scores = model.similarity(model.encode_image(images), classifier.T)
  probs = jax.nn.softmax(model.itc_scale() * scores, axis=-1)
  top_prob, top_idx = jax.lax.top_k(probs, min(k, probs.shape[-1]))
  return top_idx, top_prob
