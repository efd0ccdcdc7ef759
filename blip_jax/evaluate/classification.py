"""Top-k accuracy of class scores (zero-shot classification with CLIP or BLIP ITC)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[str, float]:
  """`top{k}` in percent: how often the true class is among the k highest of `scores` [N, C].
  Ties count against the true class (a class scored like it but ranked first by index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f'scores must be [N, C] and labels [N], got {scores.shape} and {labels.shape}')
  true = scores[np.arange(len(labels)), labels]
  better = (scores > true[:, None]).sum(1) + ((scores == true[:, None]) & (np.arange(scores.shape[1])[None] < labels[:, None])).sum(1)
  return {f'top{k}': 100.0 * float(np.mean(better < k)) for k in ks}
