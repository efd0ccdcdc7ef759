"""Language-model evaluation: the model's LM loss on the eval split's captions (`loss`), for
models judged by their loss (BLIP-2 stage 2)."""

from __future__ import annotations

import numpy as np

from blip_jax import distributed
from blip_jax.evaluate.context import EvalContext


class Evaluator:
  def __init__(self, ctx: EvalContext, *, prompt_length: int = 1, batch_size: int = 64):
    """`prompt_length`: leading text tokens left out of the loss (1: the tokenizer's first token,
    LAVIS's prompt length with no prompt)."""
    ctx.require('lm', 'loss', 'image_embeds')
    self.examples = ctx.loader(ctx.examples('pairs'), batch_size)
    self.loss = ctx.jit(lambda m, x, ids, mask: m.loss(m.image_embeds(x), ids, mask, prompt_length=prompt_length))

  def run(self, state) -> dict[str, float]:
    losses = [float(distributed.to_host(self.loss(state, b['image'], b['text_ids'], b['text_mask'])))
              for b in self.examples.epoch()]
    return {'loss': float(np.mean(losses))}
