"""The tiny models the configs' `:tiny` variants train, built with a stand-in tokenizer (no
vocabulary file), for tests of the objectives, the train state and evaluation."""

from __future__ import annotations

import importlib
import types

# Token ids of a 64-token vocabulary: [PAD] 0, [CLS] 2, [SEP] 3, [DEC] 62, [ENC] 63.
TOKENIZER = types.SimpleNamespace(vocab_size=64, bos_token_id=62, enc_token_id=63, sep_token_id=3, pad_token_id=0,
                                  cls_token_id=2)


def config(name: str, arg: str = 'tiny'):
  """`blip_jax/configs/<name>.py`'s config (each objective has a config of its name)."""
  return importlib.import_module(f'blip_jax.configs.{name}').get_config(arg)


def model_config(objective: str, tokenizer=TOKENIZER, *, dtype: str = '', **model_fields):
  """The model config the `:tiny` run of `objective` trains (`model_fields` override config.model,
  `dtype` is the run's compute dtype)."""
  from blip_jax.train import loop, objectives
  c = config(objective)
  c.model.update(model_fields)
  c.dtype = dtype
  return loop.model_config(c, objectives.get(c.objective), tokenizer)


def build(objective: str, *, seed: int = 0, tokenizer=TOKENIZER, **model_fields):
  """(objective, model config, model) of the `:tiny` run of `objective`."""
  from blip_jax import registry
  from blip_jax.train import objectives
  obj = objectives.get(objective)
  cfg = model_config(objective, tokenizer, **model_fields)
  return obj, cfg, registry.get(obj.family).build(obj.task, cfg, seed=seed)
