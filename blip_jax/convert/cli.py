"""`python convert_torch_weights.py SOURCE [SOURCE...] --out DIR`: PyTorch -> blip_jax directory.

Prints what it detected and a summary of every key; errors are one line on stderr and exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from blip_jax import model_io
from blip_jax.convert import TASKS, ConversionError, convert_checkpoint
from blip_jax.convert.readers import read_checkpoints


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='convert_torch_weights.py',
      description='Convert released PyTorch checkpoints (Salesforce BLIP .pth, OpenAI CLIP .pt, '
                  'open_clip / HF .bin / .safetensors / folders) into a blip_jax model directory.')
  p.add_argument('sources', nargs='+', metavar='SOURCE', help='checkpoint files or HF folders')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--task', default='auto', choices=('auto',) + TASKS)
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
  """One line of the sizes that were inferred, e.g. 'ViT 768x12 patch 16 @ 384 | text 768x12'."""
  parts = []
  vision = getattr(config, 'vision', None)
  if vision is not None:
    parts.append(f'ViT {vision.width}x{vision.depth} patch {vision.patch_size} @ {vision.image_size}')
  for name in ('text', 'qformer', 'opt'):
    tower = getattr(config, name, None)
    if tower is not None:
      width = getattr(tower, 'hidden_size', None) or getattr(tower, 'width')
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


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    overrides = json.loads(args.override)
    if not isinstance(overrides, dict):
      raise ValueError('expected a JSON object')
  except ValueError as e:
    print(f'error: --override is not a JSON object of config fields: {e}', file=sys.stderr)
    return 1
  if args.image_size:
    overrides['image_size'] = args.image_size
  if args.act:
    overrides['act'] = args.act
  options = {'task': args.task, 'keep_training_state': args.keep_training_state, **overrides}
  try:
    ckpt = read_checkpoints(args.sources)
    sources_sha = [model_io.sha256(f) for f in ckpt.files if os.path.isfile(f)]
    check_out_dir(args.out, sources_sha, options, args.force)
    model, config, report = convert_checkpoint(ckpt, task=args.task,
                                               keep_training_state=args.keep_training_state,
                                               **overrides)
  except (ConversionError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'detected: {model_io.family_of(config)} {report.task} ({report.layout} layout)')
  print(f'architecture: {describe(config)}')
  print(report.summary())
  provenance = {**model_io.provenance(ckpt, report), 'options': options}
  ckpt.tensors.clear()  # unmap the source before writing: peak memory stays near one model
  model_io.save(args.out, model, config, task=report.task, dtype=args.dtype, provenance=provenance)
  print(f'wrote {args.out} ({args.dtype})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
