"""Evaluators, named in a run config's `evals` (as big_vision's `config.evals`), and their metrics.

    c.evals.retrieval = evaluate.settings('retrieval', k_test=64)    # in a configs/ file
    c.evals.zs_cifar = evaluate.settings('zero_shot', dataset='cifar10')   # a second zero-shot eval

Each entry is `{type, **settings}`: `type` names a module of this package whose `Evaluator(ctx,
**settings)` has a `run(train_state) -> {metric: value}` method; its metrics are logged as
`<entry name>/<metric>`. `settings(type, ...)` lists every setting with its default (the
Evaluator's signature is the one place they are defined), so any of them can be overridden on the
command line (`--config.evals.retrieval.k_test=256`).

| type        | metrics                                   | the model needs                        |
|-------------|-------------------------------------------|----------------------------------------|
| `retrieval` | i2t_r1,5,10, t2i_r1,5,10, r_mean          | encode_image / encode_text / similarity; with k_test > 0 also itm_logits |
| `caption`   | bleu1..4, rouge_l, cider (+ meteor)       | caption_decoder                        |
| `vqa`       | accuracy (VQAv2)                          | question_states / rank_answers         |
| `nlvr`      | accuracy                                  | the NLVR2 head                         |
| `lm`        | loss (the LM loss on the eval split)      | loss                                   |
| `zero_shot` | top1, top5                                | encode_image / encode_text / similarity |

Adding an evaluator: a module here with an `Evaluator` class; a config names it by module name.
"""

from __future__ import annotations

import importlib
import inspect
import re

import ml_collections

from blip_jax.evaluate.context import EvalContext


def _evaluator_class(type_: str):
  if not re.fullmatch(r'[a-z_]+', type_ or ''):
    raise ValueError(f'evaluator type {type_!r}: expected a module name of blip_jax.evaluate')
  try:
    module = importlib.import_module(f'blip_jax.evaluate.{type_}')
  except ModuleNotFoundError:
    module = None
  if module is None or not hasattr(module, 'Evaluator'):
    raise ValueError(f'unknown evaluator type {type_!r}; the evaluators are retrieval, caption, vqa, nlvr, lm, '
                     'zero_shot')
  return module.Evaluator


def settings(type_: str, **overrides) -> ml_collections.ConfigDict:
  """Every setting of evaluator `type_` with its default, `overrides` applied, and `type`."""
  params = {name: p.default for name, p in inspect.signature(_evaluator_class(type_)).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}
  unknown = set(overrides) - set(params)
  if unknown:
    raise ValueError(f'evaluator {type_!r} has no settings {sorted(unknown)}; it has {sorted(params)}')
  return ml_collections.ConfigDict({'type': type_, **params, **overrides})


def build(evals, ctx: EvalContext) -> dict:
  """The evaluators of a run config's `evals` ({name: Evaluator})."""
  out = {}
  for name, cfg in dict(evals).items():
    cfg = dict(cfg)
    if 'type' not in cfg:
      raise ValueError(f'evals.{name} has no `type` (make it with blip_jax.evaluate.settings(type, ...))')
    out[name] = _evaluator_class(cfg.pop('type'))(ctx, **cfg)
  return out


def run(evaluators: dict, state) -> dict[str, float]:
  """Every evaluator on `state`: {'<name>/<metric>': value}."""
  metrics = {}
  for name, evaluator in evaluators.items():
    metrics.update({f'{name}/{k}': v for k, v in evaluator.run(state).items()})
  return metrics


__all__ = ['EvalContext', 'settings', 'build', 'run']
