"""`blip-jax-convert SOURCE [SOURCE...] --out DIR` (or `python convert_torch_weights.py`):
PyTorch checkpoints -> a blip_jax model directory (weights, config.json, the tokenizer's files).

Prints what it detected and a summary of every key; errors are one line on stderr and exit
status 2 (`blip_jax.cli`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from blip_jax import cli, model_io, registry
from blip_jax.convert import ConversionError, convert_checkpoint
from blip_jax.convert.readers import read_checkpoints


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='blip-jax-convert',
      description='Convert released PyTorch checkpoints (Salesforce BLIP .pth, OpenAI CLIP .pt, '
                  'open_clip / HF .bin / .safetensors / folders) into a blip_jax model directory.')
  p.add_argument('sources', nargs='+', metavar='SOURCE', help='checkpoint files or HF folders')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--family', default='auto', choices=('auto', *registry.FAMILIES),
                 help='the model family (default: detected from the keys)')
  p.add_argument('--task', default='auto', help="the family's task, e.g. BLIP caption / retrieval / vqa, "
                                                "BLIP-2 stage1 / stage2 (default: detected from the keys)")
  p.add_argument('--tokenizer', help='a tokenizer folder, vocab.txt or Hub id to store with the weights (default: '
                                     "the sources' own, else the family's usual one, e.g. bert-base-uncased)")
  p.add_argument('--no-strict', dest='strict', action='store_false',
                 help='list checkpoint keys the model does not read instead of stopping on them')
  p.add_argument('--image-size', type=int, help='resize position embeddings to this image size')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='storage dtype of the weights')
  p.add_argument('--keep-training-state', action='store_true',
                 help='also keep momentum encoders and feature queues (BLIP)')
  p.add_argument('--act', choices=('gelu', 'quick_gelu'),
                 help='CLIP activation, needed for plain open_clip / OpenAI state dicts')
  p.add_argument('--override', default='{}', metavar='JSON',
                 help='config fields, e.g. \'{"vision": {"num_heads": 2}}\'')
  p.add_argument('--force', action='store_true', help='replace an --out holding another checkpoint')
  return p.parse_args(argv)


def describe(config) -> str:
  """One line of the sizes that were inferred, e.g. 'ViT 768x12 patch 16 @ 384 | text 768x12' or
  'ResNet 3-4-6-3 width 64 @ 224 | text 512x12'."""
  parts = []
  vision = getattr(config, 'vision', None)
  if hasattr(vision, 'layers'):  # CLIP's ResNet
    parts.append(f'ResNet {"-".join(map(str, vision.layers))} width {vision.width} @ {vision.image_size}')
  elif vision is not None:
    parts.append(f'ViT {vision.width}x{vision.depth} patch {vision.patch_size} @ {vision.image_size}')
  for name in ('text', 'qformer', 'opt'):
    tower = getattr(config, name, None)
    if tower is not None:
      width = getattr(tower, 'hidden_size', None) or tower.width
      layers = tower.num_layers
      parts.append(f'{name} {width}x{layers}')
  if hasattr(config, 'num_layers'):  # a bare OPT
    parts.append(f'OPT {config.hidden_size}x{config.num_layers}')
  return ' | '.join(parts)


def check_out_dir(out: str, sources_sha: list[str], options: dict, force: bool) -> None:
  """Refuse to overwrite anything but the same conversion, unless forced."""
  if not os.path.exists(out) or force:
    return
  if not model_io.is_model_dir(out):
    if os.listdir(out):
      raise ConversionError(f'--out {out} exists and is not a blip_jax checkpoint; use --force to replace it')
    return
  old = model_io.read_config(out).get('provenance', {})
  if [s['sha256'] for s in old.get('sources', [])] != sources_sha or old.get('options') != options:
    raise ConversionError(f'--out {out} already holds a different checkpoint '
                          f"({[s['path'] for s in old.get('sources', [])]}); use --force to replace it")


def find_tokenizer(args, family, sources):
  """(tokenizer, source name) to store: --tokenizer, else the sources' own files, else the family's
  usual tokenizer from the HF cache; (None, hub id) when that is not there (it is then fetched
  when the model is first loaded)."""
  from blip_jax import hub
  from blip_jax.data import tokenizer as tokenizers
  if args.tokenizer:
    where = args.tokenizer
    if hub.looks_like_hub_id(where):
      where = hub.resolve(where, allow_patterns=hub.TOKENIZER_FILES)
    if os.path.isfile(where):
      return tokenizers.BlipTokenizer(where, with_enc=family.with_enc), args.tokenizer
    tok = tokenizers.from_folder(where, family.tokenizer)
    if tok is None:
      raise ConversionError(f'--tokenizer {args.tokenizer}: no vocab.txt or HF tokenizer files in it')
    return tok, args.tokenizer
  for source in sources:
    if os.path.isdir(source) and (tok := tokenizers.from_folder(source, family.tokenizer)) is not None:
      return tok, source
  try:
    folder = hub.resolve(family.default_tokenizer, allow_patterns=hub.TOKENIZER_FILES)
  except FileNotFoundError:
    return None, family.default_tokenizer
  return tokenizers.from_folder(folder, family.tokenizer), family.default_tokenizer


def run(argv) -> None:
  args = parse_args(argv)
  try:
    overrides = json.loads(args.override)
    if not isinstance(overrides, dict):
      raise ValueError('expected a JSON object')
  except ValueError as e:
    raise ConversionError(f'--override is not a JSON object of config fields: {e}') from None
  if args.image_size:
    overrides['image_size'] = args.image_size
  if args.act:
    overrides['act'] = args.act
  options = {'family': args.family, 'task': args.task, 'keep_training_state': args.keep_training_state,
             'strict': args.strict, **overrides}
  ckpt = read_checkpoints(args.sources)
  sources_sha = [model_io.sha256(f) for f in ckpt.files if os.path.isfile(f)]
  check_out_dir(args.out, sources_sha, options, args.force)
  model, config, report = convert_checkpoint(ckpt, family=args.family, task=args.task, strict=args.strict,
                                             keep_training_state=args.keep_training_state, **overrides)
  family = registry.family_of(config)
  tok, tok_source = find_tokenizer(args, family, args.sources)
  if tok is not None:
    registry.check_tokenizer(config, tok, where=f'--tokenizer {tok_source}')
  print(f'detected: {family.name} {report.task} ({report.layout} layout)')
  print(f'architecture: {describe(config)}')
  print(report.summary())
  print(f'tokenizer: {tok_source}' + ('' if tok is not None else ' (not in the HF cache: fetched when first used)'))
  provenance = {**model_io.provenance(ckpt, report), 'options': options}
  ckpt.tensors.clear()  # unmap the source before writing: peak memory stays near one model
  model_io.save(args.out, model, config, task=report.task, dtype=args.dtype, provenance=provenance,
                tokenizer=tok, tokenizer_source=tok_source)
  print(f'wrote {args.out} ({args.dtype})')


def main(argv=None) -> int:
  return cli.main(run, argv)


if __name__ == '__main__':
  sys.exit(main())
