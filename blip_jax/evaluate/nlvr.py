"""NLVR2 evaluation: the share of eval statements whose true / false the model predicts
(`accuracy`, percent)."""

from __future__ import annotations

import numpy as np

from blip_jax import distributed
from blip_jax.evaluate.context import EvalContext


class Evaluator:
  def __init__(self, ctx: EvalContext, *, batch_size: int = 64):
    ctx.require('nlvr', 'cls_head')
    self.examples = ctx.loader(ctx.examples('nlvr'), batch_size)
    self.predict = ctx.jit(lambda m, x0, x1, ids, mask: m(x0, x1, ids, mask).argmax(-1))

  def run(self, state) -> dict[str, float]:
    hits = total = 0
    for batch in self.examples.epoch():
      pred = distributed.to_host(self.predict(state, batch['image0'], batch['image1'], batch['text_ids'],
                                              batch['text_mask']))
      valid, label = distributed.to_host((batch['valid'], batch['label']))
      hits += int(np.sum(valid & (pred == label)))
      total += int(valid.sum())
    return {'accuracy': 100.0 * hits / total}
