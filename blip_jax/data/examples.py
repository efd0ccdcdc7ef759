"""Task example tables: what each training example is, read once from a dataset's text fields.

A table holds, per example, the source record(s) of its image(s) and its tokenized text and
labels as numpy arrays; images stay in the dataset until a batch needs them (see `loader.py`).
Three kinds of example cover every objective:

| kind      | one example per                 | columns                                          |
|-----------|---------------------------------|--------------------------------------------------|
| `pairs`   | (image, caption)                | text_ids, text_mask, image_id                    |
| `vqa`     | (image, question)               | question_ids/mask, answer_ids/mask [K, T], weights [K] |
| `nlvr`    | (two images, statement)         | text_ids, text_mask, label                       |

Datasets: `synthetic_scenes`, `blip_annotations` (caption / vqa / nlvr JSON) and the TFDS
catalog's `coco_captions`, each read through a small adapter into these kinds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from blip_jax.data.text import pre_caption, pre_question

KINDS = ('pairs', 'vqa', 'nlvr')
# Image features of each dataset family (skipped while reading the text fields).
IMAGE_FEATURES = {'synthetic_scenes': ('image', 'pair_image'), 'blip_annotations': ('image', 'image0', 'image1'),
                  'coco_captions': ('image',)}
# The project's split names (configs say 'train' / 'validation') -> a family's own, where they differ.
# TFDS coco_captions is the Karpathy split: train / val / test / restval ('train+restval' is
# Karpathy's and BLIP's full training set).
SPLIT_NAMES = {'coco_captions': {'validation': 'val'}}
READ_CHUNK = 256  # records read at a time while collecting text fields


@dataclasses.dataclass
class Examples:
  records: np.ndarray  # [N, num_images] int: the dataset records holding each example's images
  image_keys: tuple[str, ...]  # the image feature of each of those records
  columns: dict[str, np.ndarray]  # name -> [N, ...]

  def __len__(self) -> int:
    return len(self.records)


@dataclasses.dataclass
class RetrievalIndex:
  """What retrieval evaluation needs: unique images and all their texts, with the maps
  text -> image and image -> texts (several captions per image)."""
  image_records: np.ndarray  # [I] dataset record of each image
  text_ids: np.ndarray  # [T, L]
  text_mask: np.ndarray
  texts: list[str]  # as the model reads them (`pre_caption`)
  txt2img: np.ndarray  # [T] image index of each text
  img2txt: list[np.ndarray]  # per image, its text indices
  raw_texts: list[str]  # as the dataset has them (what caption scores compare against)


def family(dataset_name: str) -> str:
  name = dataset_name.split('/')[0]
  if name not in IMAGE_FEATURES:
    raise ValueError(f'no example adapter for dataset {dataset_name!r}; known: {sorted(IMAGE_FEATURES)}')
  return name


def split_name(dataset_name: str, split: str) -> str:
  """The dataset's own name for `split` (`SPLIT_NAMES`; other names pass through)."""
  return SPLIT_NAMES.get(dataset_name.split('/')[0], {}).get(split, split)


def data_source(builder: tfds.core.DatasetBuilder, split: str, **kwargs):
  """`builder.as_data_source` of `split` under the dataset's own split name."""
  return builder.as_data_source(split_name(builder.name, split), **kwargs)


def _read_fields(builder: tfds.core.DatasetBuilder, split: str, drop, chunk: int = READ_CHUNK) -> list[dict]:
  """Every record of `split` without the features `drop`, which are never decoded: records are
  read as serialized bytes, `chunk` at a time, and parsed for the other features only."""
  keep = tfds.features.FeaturesDict({k: f for k, f in builder.info.features.items() if k not in drop})
  source = data_source(builder, split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  out = []
  for start in range(0, len(source), chunk):
    rows = list(range(start, min(start + chunk, len(source))))
    out += [keep.deserialize_example_np(r) for r in source.__getitems__(rows)]
  return out


def read_text_fields(builder: tfds.core.DatasetBuilder, split: str, chunk: int = READ_CHUNK) -> list[dict]:
  """Every record of `split` as numpy without its image features: images are neither decoded
  nor kept (only one chunk of serialized records is in memory at a time)."""
  name = family(builder.name)
  return _read_fields(builder, split, [k for k in IMAGE_FEATURES[name] if k in builder.info.features], chunk)


def _str(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def caption_rows(name: str, record: dict):
  """(image_id, [captions]) of one record."""
  if name == 'coco_captions':
    return int(record['image/id']), [_str(t) for t in record['captions']['text']]
  return record['image_id'], [_str(t) for t in record['captions']]


def _vqa_rows(name: str, record: dict):
  """[(question, answers, weights)] of one record."""
  if name == 'synthetic_scenes':
    return [(_str(q), [_str(a)], [1.0]) for q, a in zip(record['questions'], record['answers'])]
  if name == 'blip_annotations':
    return [(_str(record['question']), [_str(a) for a in record['answers']], list(record['weights']))]
  raise ValueError(f'{name} has no VQA examples')


def _nlvr_row(name: str, record: dict):
  """(image keys, statement, label) of one record."""
  if name == 'synthetic_scenes':
    return ('image', 'pair_image'), _str(record['statement']), int(record['label'])
  if name == 'blip_annotations':
    return ('image0', 'image1'), _str(record['sentence']), int(record['label'])
  raise ValueError(f'{name} has no NLVR2 examples')


def _image_ids(raw_ids) -> np.ndarray:
  """Image ids as int32 (string ids of annotation files are numbered by first appearance)."""
  raw = [_str(i) if isinstance(i, (bytes, str)) else int(i) for i in raw_ids]
  numbers = {}
  return np.asarray([numbers.setdefault(i, len(numbers)) for i in raw], np.int32)


def pairs(name: str, records: list[dict], tokenizer, max_length: int, prompt: str = '',
          max_words: int = 30) -> Examples:
  """`prompt` is prepended to every cleaned caption (caption fine-tuning's 'a picture of ')."""
  name = family(name)
  rows = [(r, image_id, prompt + pre_caption(c, max_words)) for r, rec in enumerate(records)
          for image_id, caps in [caption_rows(name, rec)] for c in caps]
  ids, mask = tokenizer.encode([t for _, _, t in rows], max_length)
  return Examples(np.asarray([[r] for r, _, _ in rows]), ('image',),
                  {'text_ids': ids, 'text_mask': mask, 'image_id': _image_ids([i for _, i, _ in rows])})


def vqa(name: str, records: list[dict], tokenizer, question_length: int, answer_length: int,
        num_answers: int) -> Examples:
  """Answers padded to `num_answers` candidates per question (unused ones weigh 0); questions
  with more answers keep the `num_answers` heaviest."""
  name = family(name)
  rows = [(r, pre_question(q), a, w) for r, rec in enumerate(records) for q, a, w in _vqa_rows(name, rec)]
  q_ids, q_mask = tokenizer.encode([q for _, q, _, _ in rows], question_length)
  answers, weights = [], np.zeros((len(rows), num_answers), np.float32)
  for n, (_, _, a, w) in enumerate(rows):
    keep = np.argsort(-np.asarray(w), kind='stable')[:num_answers]
    answers += [a[k] for k in keep] + [''] * (num_answers - len(keep))
    weights[n, :len(keep)] = np.asarray(w)[keep]
  a_ids, a_mask = tokenizer.encode(answers, answer_length, 'dec')
  shape = (len(rows), num_answers, answer_length)
  return Examples(np.asarray([[r] for r, _, _, _ in rows]), ('image',),
                  {'question_ids': q_ids, 'question_mask': q_mask, 'answer_ids': a_ids.reshape(shape),
                   'answer_mask': a_mask.reshape(shape), 'weights': weights})


def nlvr(name: str, records: list[dict], tokenizer, max_length: int) -> Examples:
  name = family(name)
  rows = [_nlvr_row(name, rec) for rec in records]
  ids, mask = tokenizer.encode([pre_caption(s) for _, s, _ in rows], max_length)
  keys = rows[0][0] if rows else ('image0', 'image1')
  n = np.arange(len(rows))
  return Examples(np.stack([n, n], 1), keys,
                  {'text_ids': ids, 'text_mask': mask, 'label': np.asarray([l for _, _, l in rows], np.int32)})


def retrieval_index(name: str, records: list[dict], tokenizer, max_length: int, max_words: int = 30
                    ) -> RetrievalIndex:
  """Every image once and all its captions (BLIP's `coco_karpathy_caption_eval` layout)."""
  name = family(name)
  raw, txt2img, img2txt = [], [], []
  for r, rec in enumerate(records):
    _, caps = caption_rows(name, rec)
    img2txt.append(np.arange(len(raw), len(raw) + len(caps)))
    raw += caps
    txt2img += [r] * len(caps)
  texts = [pre_caption(c, max_words) for c in raw]
  ids, mask = tokenizer.encode(texts, max_length)
  return RetrievalIndex(np.arange(len(records)), ids, mask, texts, np.asarray(txt2img), img2txt, raw)


def build(kind: str, name: str, records: list[dict], tokenizer, config, prompt: str = '') -> Examples:
  """The `kind` table of a dataset; `config` holds the text lengths (ml_collections or dict)."""
  if kind == 'pairs':
    return pairs(name, records, tokenizer, config['text_length'], prompt)
  if kind == 'vqa':
    return vqa(name, records, tokenizer, config['text_length'], config['answer_length'], config['num_answers'])
  if kind == 'nlvr':
    return nlvr(name, records, tokenizer, config['text_length'])
  raise ValueError(f'unknown example kind {kind!r}; expected one of {KINDS}')


def classification(builder: tfds.core.DatasetBuilder, split: str, image_key: str, label_key: str,
                   first_label: int, num_classes: int) -> Examples:
  """Every image of `split` with its class (label value - `first_label`), for zero-shot
  classification; only the labels are read here, the images when batches are loaded."""
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(f'{builder.name}: no feature {key!r} (zero-shot image_key / label_key); '
                       f'it has {sorted(features)}')
  labels = np.asarray([int(r[label_key]) for r in _read_fields(builder, split, (image_key,))], np.int64) - first_label
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(bad):
    raise ValueError(f'{builder.name}[{split}] record {bad[0]}: {label_key} = {labels[bad[0]] + first_label} is '
                     f'not one of the {num_classes} classes (first_label {first_label})')
  return Examples(np.arange(len(labels))[:, None], (image_key,), {'label': labels})

