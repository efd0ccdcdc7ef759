"""CapFilt's jitted step: nucleus-sampled captions and the filter's ITM scores in one call."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from blip_jax import generate

# The originals' nucleus sampling for CapFilt (BLIP `generate(sample=True, top_p=0.9, max_length=30,
# min_length=5)`, repetition penalty 1.1 with sampling).
SAMPLING = dict(top_p=0.9, repetition_penalty=1.1, max_length=30, min_length=5)


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings of the jitted step (hashable, so equal runs reuse the compiled step)."""
  prompt: str  # the captioner's (its config's)
  prompt_ids: tuple[int, ...]
  num_captions: int
  text_length: int  # the filter's text length
  eos_token_id: int
  pad_token_id: int
  cls_token_id: int
  special_ids: tuple[int, ...]  # what `decode(skip_special_tokens=True)` drops
  shared_model: bool  # captioner and filter are one model: embed the images once


def filter_text(generated, spec: Spec):
  """Sampled ids [N, L] ('[DEC] prompt caption [SEP] pad') -> the filter's ids and mask [N, T]:
  '[CLS] caption [SEP]' padded, what the tokenizer makes of the decoded, prompt-stripped caption
  (special tokens dropped, truncated to T), built on device so sampling and scoring are one step."""
  gen = generated[:, len(spec.prompt_ids):]
  keep = ~jnp.isin(gen, jnp.asarray(spec.special_ids))
  content = jnp.take_along_axis(gen, jnp.argsort(~keep, axis=1, stable=True), axis=1)  # kept tokens first
  t = spec.text_length
  n = jnp.minimum(keep.sum(1), t - 2)[:, None]
  content = jnp.pad(content, ((0, 0), (0, max(t - 1 - content.shape[1], 0))))[:, :t - 1]
  full = jnp.concatenate([jnp.full((gen.shape[0], 1), spec.cls_token_id, gen.dtype), content], 1)
  pos = jnp.arange(t)[None]
  ids = jnp.where(pos <= n, full, jnp.where(pos == n + 1, spec.eos_token_id, spec.pad_token_id))
  return ids.astype(jnp.int32), (pos <= n + 1).astype(jnp.int32)


def capfilt_step(cap_graph, filt_graph, spec: Spec, cap_state, filt_state, images, web_ids, web_mask, key):
  """One batch: `num_captions` nucleus samples per image, then the ITM match probability of every
  web text and sampled caption with its image.

  images [B, S, S, 3], web_ids / web_mask [B, W, T] -> sampled ids [B, K, L], scores [B, W + K]
  (the web texts first)."""
  captioner = nnx.merge(cap_graph, cap_state)
  filt = captioner if spec.shared_model else nnx.merge(filt_graph, filt_state)
  b, w, t = web_ids.shape
  k = spec.num_captions
  embeds = captioner.image_embeds(images)
  ids, mask = web_ids, web_mask
  sampled = jnp.zeros((b, 0, SAMPLING['max_length']), jnp.int32)
  if k:
    prompt = jnp.broadcast_to(jnp.asarray(spec.prompt_ids, jnp.int32), (b, len(spec.prompt_ids)))
    decoder, condition = captioner.caption_decoder(embeds)
    sampled = generate.sample(decoder, condition, prompt, rng=key, num_return_sequences=k,
                              eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, **SAMPLING)
    syn_ids, syn_mask = filter_text(sampled.reshape(b * k, -1), spec)
    ids = jnp.concatenate([web_ids, syn_ids.reshape(b, k, t)], 1)
    mask = jnp.concatenate([web_mask, syn_mask.reshape(b, k, t)], 1)
  filt_embeds = embeds if spec.shared_model else filt.image_embeds(images)
  logits = filt.itm_logits(jnp.repeat(filt_embeds, w + k, 0), ids.reshape(-1, t), mask.reshape(-1, t))
  return sampled, jax.nn.softmax(logits, -1)[:, 1].reshape(b, w + k)


# Module level, so runs in one process with the same models and shapes share the compiled step.
jitted_step = jax.jit(capfilt_step, static_argnums=(0, 1, 2))


def batch_key(seed: int, chunk: int, batch: int):
  """The sampling key of batch `batch` (0-based within its chunk) of chunk `chunk`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), chunk), batch)
