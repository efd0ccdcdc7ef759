"""What every evaluator reads: the run's dataset and eval split, its tokenizer and image
preprocessing, the batch sharding, and the model held by a train state.

Evaluators run batched under jit on the global batch (sharded like training batches, across
hosts); only the final ranking and metric arithmetic is numpy on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from blip_jax import distributed
from blip_jax.data import examples as examples_lib
from blip_jax.data.loader import BatchLoader
from blip_jax.data.transforms import image_function


@dataclasses.dataclass
class EvalContext:
  builder: Any  # the run's prepared TFDS builder
  data: Any  # the run config's `data` section (eval_split, text lengths, ...)
  tokenizer: Any
  image_size: int
  image_transform: str  # the family's eval preprocessing ('blip_eval' | 'clip_eval')
  sharding: jax.sharding.Sharding | None  # of eval batches (None: one process, no mesh)
  model_of: Callable[[Any], nnx.Module]  # train state -> model
  abstract_model: nnx.Module  # shapes only: what the model can do, before anything runs
  prompt: str = ''  # what captions continue (the model config's)
  train_examples: examples_lib.Examples | None = None  # the training table (VQA's candidate answers)
  _records: dict = dataclasses.field(default_factory=dict)
  _index: examples_lib.RetrievalIndex | None = None

  # ------------------------------------------------------------------ data
  def records(self, split: str | None = None) -> list[dict]:
    """The text fields of every record of `split` (default: the eval split), read once."""
    split = split or self.data.eval_split
    if split not in self._records:
      self._records[split] = examples_lib.read_text_fields(self.builder, split)
    return self._records[split]

  def retrieval_index(self) -> examples_lib.RetrievalIndex:
    """Every eval image once with all its captions (retrieval and caption evaluation)."""
    if self._index is None:
      self._index = examples_lib.retrieval_index(self.builder.name, self.records(), self.tokenizer,
                                                 self.data.text_length)
    return self._index

  def examples(self, kind: str) -> examples_lib.Examples:
    """The eval split as a table of `kind` examples (vqa, nlvr, pairs)."""
    return examples_lib.build(kind, self.builder.name, self.records(), self.tokenizer, self.data)

  def loader(self, examples: examples_lib.Examples, batch_size: int, builder=None, split: str | None = None
             ) -> BatchLoader:
    """Every example once, in order, the last batch padded (`valid` marks the real rows)."""
    builder = builder or self.builder
    source = examples_lib.data_source(builder, split or self.data.eval_split)
    return BatchLoader(examples, source, image_function(self.image_transform, self.image_size), batch_size,
                       shuffle=False, drop_remainder=False, sharding=self.sharding)

  def image_loader(self, batch_size: int) -> BatchLoader:
    """Every image of the retrieval index once."""
    images = examples_lib.Examples(self.retrieval_index().image_records[:, None], ('image',), {})
    return self.loader(images, batch_size)

  # ------------------------------------------------------------------ model
  def require(self, evaluator: str, *methods: str) -> None:
    """A clear error before anything runs when the model cannot do what `evaluator` needs."""
    missing = [m for m in methods if not hasattr(self.abstract_model, m)]
    if missing:
      raise ValueError(f'evals.{evaluator} needs a model with {", ".join(missing)}; this run trains a '
                       f'{type(self.abstract_model).__name__}')

  def jit(self, fn: Callable) -> Callable:
    """`fn(model, *args)` as a jitted `f(state, *args)` (the model is rebuilt inside)."""
    model_of = self.model_of
    return jax.jit(lambda state, *args: fn(model_of(state), *args))


def over_batches(loader: BatchLoader, fn: Callable, desc: str) -> Any:
  """`fn(batch)` (a pytree of arrays with rows first) over one pass of `loader`, concatenated as
  numpy without the padding rows."""
  import tqdm
  out = []
  for batch in tqdm.tqdm(loader.epoch(), total=loader.steps_per_epoch, desc=desc, leave=False):
    valid = distributed.to_host(batch['valid'])
    out.append(jax.tree.map(lambda x: x[valid], distributed.to_host(fn(batch))))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def chunks(n: int, size: int) -> Iterator[np.ndarray]:
  """Row indices [0, n) in chunks of `size`, each padded to `size` with its first row (one
  compiled shape); yields (padded indices, number of real rows)."""
  for start in range(0, n, size):
    rows = np.arange(start, min(start + size, n))
    yield np.concatenate([rows, np.full(size - len(rows), rows[0])]), len(rows)


def over_rows(fn: Callable, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
  """`fn(*row_chunks)` over the rows of `arrays` in padded chunks of `batch_size`, concatenated."""
  out = [distributed.to_host(fn(*(a[rows] for a in arrays)))[:n] for rows, n in chunks(len(arrays[0]), batch_size)]
  return np.concatenate(out)
