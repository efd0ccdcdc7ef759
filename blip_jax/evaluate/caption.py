"""Caption evaluation: caption every eval image (greedy, or beam search with `num_beams > 1`)
from the model's prompt, and score the captions against the image's references as the dataset
has them (not `pre_caption`-cleaned), both tokenised as the COCO evaluation does.

Metrics: `bleu1` ... `bleu4`, `rouge_l`, `cider` (and `meteor` with `meteor=True`), in percent
(`caption_metrics`). `samples` keeps the first `show` (generated, references) pairs to print.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from blip_jax import generate
from blip_jax.evaluate import caption_metrics
from blip_jax.evaluate.context import EvalContext, over_batches

log = logging.getLogger(__name__)


class Evaluator:
  def __init__(self, ctx: EvalContext, *, max_length: int = 30, min_length: int = 5, num_beams: int = 1,
               meteor: bool = False, show: int = 5, batch_size: int = 64):
    ctx.require('caption', 'image_embeds', 'caption_decoder')
    self.ctx, self.show, self.meteor = ctx, show, meteor
    self.index = ctx.retrieval_index()
    self.images = ctx.image_loader(batch_size)
    tok = ctx.tokenizer
    prompt_ids = jnp.asarray(tok.decoder_prompt(ctx.prompt))
    lengths = dict(max_length=max_length, min_length=min_length, eos_token_id=tok.sep_token_id,
                   pad_token_id=tok.pad_token_id)

    def caption(m, images):
      decoder, condition = m.caption_decoder(m.image_embeds(images))
      start = jnp.broadcast_to(prompt_ids, (images.shape[0], prompt_ids.shape[1]))
      if num_beams > 1:
        return generate.beam_search(decoder, condition, start, num_beams=num_beams, **lengths)[0][:, 0]
      return generate.greedy(decoder, condition, start, **lengths)

    self.caption = ctx.jit(caption)
    self.samples = []

  def run(self, state) -> dict[str, float]:
    tok, index = self.ctx.tokenizer, self.index
    ids = over_batches(self.images, lambda b: self.caption(state, b['image']), 'eval captions')
    texts = [tok.strip_prompt(t, self.ctx.prompt) for t in tok.decode(ids)]
    refs = [[index.raw_texts[t] for t in texts_of] for texts_of in index.img2txt]  # raw, as BLIP scores COCO
    with_meteor = self.meteor
    if with_meteor and not caption_metrics.meteor_available():
      log.warning('evals.caption.meteor: METEOR skipped, it needs `java` on PATH and pycocoevalcap (or METEOR_JAR)')
      with_meteor = False
    self.samples = list(zip(texts, refs))[:self.show]
    return caption_metrics.caption_metrics(texts, refs, with_meteor=with_meteor)
