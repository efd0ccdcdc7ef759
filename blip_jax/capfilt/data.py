"""CapFilt's input: the source dataset, its web texts, and the simulated noise."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np

from blip_jax.cli import InputError
from blip_jax.inference import Predictor

MAX_WORDS = 30  # pre_caption's word limit of the originals' pretraining data
CORRUPT_STREAM = 7  # the numpy stream of the simulated corruption (apart from anything else seeded)


def source_config(args):
  """The `data` section (as in a training config) of `--data`, for `datasets.builder`."""
  import ml_collections
  if args.data.endswith('.json'):
    if not os.path.isfile(args.data):
      raise InputError(f'--data {args.data}: no such annotation file')
    if not args.image_root:
      raise InputError(f'--data {args.data} needs --image-root (the folder its image paths are relative to)')
    digest = hashlib.sha256(pathlib.Path(args.data).read_bytes()).hexdigest()[:12]
    return ml_collections.ConfigDict({
        'name': 'blip_annotations', 'task': 'caption', 'annotations': {args.split: os.path.abspath(args.data)},
        'image_root': os.path.abspath(args.image_root), 'config_name': f'capfilt_{digest}',  # new file, new build
        'data_dir': args.data_dir or os.path.join(args.out, 'source_tfds')})
  return ml_collections.ConfigDict({'name': args.data, 'data_dir': args.data_dir})


def open_source(data, split: str):
  """The prepared builder of `data` and its dataset family (`examples.family`)."""
  from blip_jax.data import datasets
  from blip_jax.data import examples as examples_lib
  try:
    family = examples_lib.family(data['name'])
    b = datasets.builder(data)
  except ValueError as e:  # an unknown dataset family, or a bad annotation entry
    raise InputError(f'--data {data["name"]}: {e}') from e
  except Exception as e:  # noqa: BLE001 - tfds reports an unknown name or a failed build in many ways
    raise InputError(f'--data {data["name"]}: cannot build the dataset ({type(e).__name__}: {e}); CapFilt reads '
                     'synthetic_scenes/<tiny|small|large>, coco_captions or a caption annotation JSON') from e
  if split not in b.info.splits:
    raise InputError(f'--split {split}: {b.name} has the splits {sorted(b.info.splits)}')
  return b, family


def read_web_texts(b, family: str, split: str) -> tuple[list, list[list[str]]]:
  """Every record's image id and captions (its web texts), in record order."""
  from blip_jax.data import examples as examples_lib
  rows = [examples_lib.caption_rows(family, r) for r in examples_lib.read_text_fields(b, split)]
  as_json = lambda i: i.decode() if isinstance(i, bytes) else i.item() if isinstance(i, np.generic) else i
  return [as_json(i) for i, _ in rows], [list(c) for _, c in rows]


def corrupt(texts: list[list[str]], fraction: float, seed: int) -> tuple[list[list[str]], list[list[bool]]]:
  """Simulated noisy web text: `fraction` of all texts, chosen with `seed`, each replaced by a
  caption of another image that is not one of this image's own captions. Returns the texts and
  which were replaced."""
  out = [list(t) for t in texts]
  replaced = [[False] * len(t) for t in texts]
  flat = [(r, j) for r, t in enumerate(texts) for j in range(len(t))]
  n = int(round(fraction * len(flat)))
  if not n:
    return out, replaced
  if len(texts) < 2:
    raise InputError('--corrupt-fraction needs at least 2 images (a replacement comes from another image)')
  rng = np.random.default_rng([seed, CORRUPT_STREAM])
  for k in rng.choice(len(flat), n, replace=False):
    r, j = flat[k]
    for _ in range(1000):
      other = int(rng.integers(len(texts)))
      if other != r and texts[other]:
        caption = texts[other][int(rng.integers(len(texts[other])))]
        if caption not in texts[r]:
          break
    else:
      raise InputError(f'--corrupt-fraction: found no caption of another image that differs from image {r}\'s own')
    out[r][j], replaced[r][j] = caption, True
  return out, replaced


def web_table(texts: list[list[str]], filt: Predictor, text_length: int):
  """The loader's columns: web text ids / mask [N, W, T] (W = most texts of a record; the
  missing ones are empty texts whose scores are not read) and the record index."""
  from blip_jax.data.text import pre_caption
  w = max(1, max(len(t) for t in texts))
  flat = [pre_caption(t[j], MAX_WORDS) if j < len(t) else '' for t in texts for j in range(w)]
  ids, mask = filt.tokenizer.encode(flat, text_length)
  n = len(texts)
  return {'web_ids': ids.reshape(n, w, text_length), 'web_mask': mask.reshape(n, w, text_length),
          'record': np.arange(n)}
