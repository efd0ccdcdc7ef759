"""HF `OPTForCausalLM` checkpoints -> blip_jax OPT (names are HF's; the LM head is tied)."""

from __future__ import annotations

import re

import numpy as np

from blip_jax import registry
from blip_jax.convert.readers import Checkpoint
from blip_jax.convert.tree import ConversionError, Report, Rules, assign, count_indexed
from blip_jax.models import opt as opt_models
from blip_jax.models.variables import build_abstract, materialise_initial_values

EXPECTED_UNUSED = ((r'\.position_ids$', 'buffer (position indices), not a parameter'),)


def infer_config(t, prefix: str, hf_config, overrides) -> opt_models.OPTConfig:
  """OPTConfig from the tensors under `prefix` ('' for a bare OPT, 'opt_model.' inside BLIP-2)."""
  d = f'{prefix}model.decoder.'
  vocab, embed_dim = t[f'{d}embed_tokens.weight'].shape
  hidden = t[f'{d}layers.0.self_attn.q_proj.weight'].shape[0]
  cfg = dict(vocab_size=vocab, hidden_size=hidden, num_heads=hidden // 64,
             num_layers=count_indexed(t, re.escape(d) + r'layers\.(\d+)\.'),
             ffn_dim=t[f'{d}layers.0.fc1.weight'].shape[0],
             max_position_embeddings=t[f'{d}embed_positions.weight'].shape[0]
             - opt_models.OPTDecoder.POSITION_OFFSET,
             word_embed_proj_dim=embed_dim if embed_dim != hidden else None,
             do_layer_norm_before=f'{d}final_layer_norm.weight' in t,
             enable_bias=f'{d}layers.0.self_attn.q_proj.bias' in t)
  for ours, theirs in (('num_heads', 'num_attention_heads'), ('act', 'activation_function'),
                       ('pad_token_id', 'pad_token_id'), ('bos_token_id', 'bos_token_id'),
                       ('eos_token_id', 'eos_token_id'), ('do_layer_norm_before', 'do_layer_norm_before')):
    if hf_config and theirs in hf_config:
      cfg[ours] = hf_config[theirs]
  cfg.update(overrides)
  try:
    return opt_models.OPTConfig(**cfg)
  except TypeError as e:
    raise ConversionError(f'bad OPT config override: {e}') from e


def tie_lm_head(tensors, prefix: str, report: Report) -> None:
  key, ref = f'{prefix}lm_head.weight', f'{prefix}model.decoder.embed_tokens.weight'
  if key in tensors:
    if not np.array_equal(tensors[key], tensors[ref]):
      raise ConversionError(f'{report.source}: {key!r} differs from {ref!r}; OPT ties them')
    report.skipped[key] = f'tied to {ref}'
    del tensors[key]


def convert(ckpt: Checkpoint, *, task: str = 'auto', strict: bool = True, seed: int = 0, **overrides):
  """A bare HF OPTForCausalLM checkpoint. Returns (model, config, report)."""
  tensors = ckpt.tensors.renamed(str)
  try:
    cfg = infer_config(tensors, '', ckpt.hf_config, overrides)
  except KeyError as e:
    raise ConversionError(f'{ckpt.source}: not an OPT checkpoint, key {e} is missing') from e
  report = Report(source=ckpt.source, layout='huggingface', task='lm')
  tie_lm_head(tensors, '', report)
  make = lambda: registry.build('opt', 'lm', cfg, seed=seed)
  model = build_abstract(make)
  assign(model, tensors, Rules(expected_unused=EXPECTED_UNUSED), report, strict=strict)
  materialise_initial_values(model, make)
  return model, cfg, report
