"""Dataset builders and tokenizers from a run config's `data` section.

| `data.name`                | what                                                            |
|----------------------------|-----------------------------------------------------------------|
| `synthetic_scenes/<size>`  | generated here (tiny / small / large), with its own vocabulary  |
| `blip_annotations`         | your files: `data.task` (caption / vqa / nlvr), `data.annotations` {split: JSON path}, `data.image_root` |
| `coco_captions`            | the TFDS catalog dataset (downloads where the network allows); Karpathy splits train / val / |
|                            | test / restval, `validation` read as `val` |

Builders are prepared in the ArrayRecord format, which gives the loaders random access.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from blip_jax import distributed
from blip_jax.data import annotations, synthetic_scenes
from blip_jax.data.tokenizer import BlipTokenizer

FILE_FORMAT = 'array_record'


def builder(data) -> tfds.core.DatasetBuilder:
  """The (prepared) dataset builder of `data`; builds it on first use. In a multi-host run the
  first process prepares it while the others wait, then they open what it wrote."""
  return distributed.primary_first(f'dataset {data["name"]} prepared', lambda: _prepared(data))


def _prepared(data) -> tfds.core.DatasetBuilder:
  name, data_dir = data['name'], data.get('data_dir') or None
  if name.startswith('synthetic_scenes'):
    config = name.split('/')[1] if '/' in name else 'small'
    b = synthetic_scenes.SyntheticScenes(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  elif name == 'blip_annotations':
    files = {split: path for split, path in dict(data.get('annotations') or {}).items() if path}
    missing = [k for k, v in (('task', data.get('task')), ('annotations', files), ('image_root', data.get('image_root')))
               if not v]
    if missing:
      raise ValueError(f'data.name=blip_annotations needs data.{", data.".join(missing)}')
    cfg = annotations.BlipAnnotationsConfig(
        name=data.get('config_name', 'custom'), task=data['task'], annotations=files,
        image_root=data['image_root'], skip_bad_examples=data.get('skip_bad_examples', False),
        images_outside_root=data.get('images_outside_root', False))
    b = annotations.BlipAnnotations(config=cfg, data_dir=data_dir, file_format=FILE_FORMAT)
  else:
    b = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
  b.download_and_prepare()
  return b


def tokenizer(data, b: tfds.core.DatasetBuilder, *, with_enc: bool = True) -> BlipTokenizer:
  """`data.vocab` (a vocab.txt or a bert-base-uncased folder), else the dataset's own vocabulary;
  `with_enc`: add BLIP's `[ENC]` (`[DEC]` is always added)."""
  vocab = data.vocab or None
  if vocab is None:
    if not isinstance(b, synthetic_scenes.SyntheticScenes):
      raise ValueError(f'data.vocab is required for {b.name}: point it at a bert-base-uncased folder or vocab.txt')
    vocab = synthetic_scenes.vocab_path(b)
  if not os.path.exists(vocab):
    raise FileNotFoundError(f'data.vocab: {vocab} does not exist')
  return BlipTokenizer(vocab, with_enc=with_enc)
