"""Local datasets in BLIP's annotation formats, as a TFDS builder (`blip_annotations`).

Fine-tune on your own data by writing one JSON list per split in one of these formats
(the originals' files for COCO / Flickr30k / VQAv2 / Visual Genome QA / NLVR2 use them):

| task      | each entry                                                                  |
|-----------|-----------------------------------------------------------------------------|
| `caption` | `{"image": "rel/path.jpg", "caption": "text" or ["text", ...], "image_id": any}` |
| `vqa`     | `{"image": ..., "question": ..., "question_id": int, "answer": [..] or "..", "dataset": "vqa" or "vg"}` |
| `nlvr`    | `{"images": ["a.png", "b.png"], "sentence": ..., "label": true/false or "True"/"False"}` |

Image paths are relative to `image_root`. A caption dataset stores each image once, with all
its captions in file order, however the file lists them: one entry per image with a caption
list, or one entry per caption (as BLIP's `coco_karpathy_train.json`); entries of one image must
agree on its `image_id`. VQA answers become (unique answer, weight) pairs with
the originals' weights (each occurrence counts 1 / number of answers; Visual Genome's single
answer has weight 1). A missing image or a malformed entry is an error naming the file and the
entry's index, unless `skip_bad_examples`, which skips it and logs the count.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from blip_jax.data import image_files

TASKS = ('caption', 'vqa', 'nlvr')
REQUIRED = {'caption': ('image', 'caption'), 'vqa': ('image', 'question', 'question_id'),
            'nlvr': ('images', 'sentence', 'label')}


IMAGE_KEYS = ('image', 'image0', 'image1')


class AnnotationError(ValueError):
  pass


def read_annotations(path: str) -> list[dict[str, Any]]:
  try:
    with open(path, encoding='utf-8-sig') as f:  # JSON is UTF-8 (a byte-order mark is accepted)
      entries = json.load(f)
  except FileNotFoundError:
    raise AnnotationError(f'annotation file not found: {path}') from None
  except UnicodeDecodeError as e:
    raise AnnotationError(f'{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 4]!r}); '
                          'save it as UTF-8') from None
  except json.JSONDecodeError as e:
    if not e.doc.strip():
      raise AnnotationError(f'{path}: the file is empty (expected a JSON list of entries)') from None
    raise AnnotationError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(entries, list):
    raise AnnotationError(f'{path}: expected a JSON list of entries, got {type(entries).__name__}')
  return entries


VG_ANSWER_WEIGHT = 0.2  # BLIP's vqa_dataset: a Visual Genome answer counts as a fifth of a VQAv2 vote


def vqa_answer_weights(answers, dataset: str = 'vqa') -> tuple[list[str], list[float]]:
  """Unique answers and their weights, as BLIP's vqa_dataset computes them: VQAv2 (`dataset`
  'vqa') weighs each answer by its share of the annotators' answers; a Visual Genome question
  ('vg') has one answer of weight 0.2; a single string answer of another source weighs 1."""
  if dataset == 'vg':
    if not isinstance(answers, str):
      raise AnnotationError(f'a Visual Genome ("dataset": "vg") answer is one string, got {answers!r}')
    return [answers], [VG_ANSWER_WEIGHT]
  if isinstance(answers, str):
    return [answers], [1.0]
  weights: dict[str, float] = {}
  for answer in answers:
    weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
  return list(weights), list(weights.values())


def check_image(path: str, checked: dict[str, str | bool] | None = None) -> bool:
  """Whether the image file `path` can be stored as it is (else its decoded pixels are; see
  `image_files`); raises `AnnotationError` if it is missing, does not decode or is too large.
  `checked` remembers the outcome per path, so an image shared by several entries is read once."""
  checked = {} if checked is None else checked
  if path not in checked:
    try:
      checked[path] = image_files.stored_as_is(path)
    except image_files.ImageError as e:
      checked[path] = str(e)
  if isinstance(checked[path], str):
    raise AnnotationError(checked[path])
  return checked[path]


def image_path(root: str, name: str, outside_root: bool = False) -> str:
  """`name` (an annotation's image) read relative to `root`; a name that leaves it (`../x`, an
  absolute path) is an error unless `outside_root`."""
  root = os.path.abspath(root)
  path = os.path.normpath(os.path.join(root, name))
  if not outside_root and os.path.commonpath([path, root]) != root:
    raise AnnotationError(f'image path {name!r} leaves the image root {root}; image paths are read relative to it '
                          '(set data.images_outside_root=True to allow it)')
  return path


def _text(entry: dict, key: str) -> str:
  value = entry[key]
  if not isinstance(value, str) or not value.strip():
    raise AnnotationError(f'{key} must be non-empty text, got {value!r}')
  return value


def to_example(entry: dict, task: str, image_root: str, checked: dict[str, str | bool] | None = None,
               outside_root: bool = False) -> dict[str, Any]:
  """One annotation entry -> the builder's feature dict (image paths resolved and checked, values
  normalised)."""
  missing = [k for k in REQUIRED[task] if k not in entry]
  if missing:
    raise AnnotationError(f'missing keys {missing} (a {task} entry needs {list(REQUIRED[task])})')
  paths = entry['images'] if task == 'nlvr' else [entry['image']]
  if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
    raise AnnotationError(f'image paths must be strings, got {paths!r}')
  paths = [image_path(image_root, p, outside_root) for p in paths]
  for p in paths:
    check_image(p, checked)
  if task == 'caption':
    captions = list(entry['caption']) if isinstance(entry['caption'], list) else [entry['caption']]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
      raise AnnotationError(f'caption must be non-empty text or a non-empty list of it, got {entry["caption"]!r}')
    return {'image': paths[0], 'captions': captions, 'image_id': str(entry.get('image_id', entry['image']))}
  if task == 'vqa':
    answers, weights = vqa_answer_weights(entry.get('answer', []), entry.get('dataset', 'vqa'))
    return {'image': paths[0], 'question': _text(entry, 'question'), 'question_id': int(entry['question_id']),
            'answers': answers, 'weights': np.asarray(weights, np.float32)}
  label = entry['label']
  if isinstance(label, str):
    if label not in ('True', 'False'):
      raise AnnotationError(f'label must be true/false or "True"/"False", got {label!r}')
    label = label == 'True'
  if len(paths) != 2:
    raise AnnotationError(f'an nlvr entry needs exactly 2 images, got {len(paths)}')
  return {'image0': paths[0], 'image1': paths[1], 'sentence': _text(entry, 'sentence'), 'label': int(bool(label))}


def _stored(example: dict, checked: dict[str, str | bool]) -> dict:
  """The example with each image as TFDS stores it: the file's bytes, or its decoded pixels where
  TFDS would decode the file differently from `image_files` (CMYK, 16-bit, RGBA, palette, ...)."""
  return {k: v if k not in IMAGE_KEYS or checked[v] else image_files.read(v) for k, v in example.items()}


class BlipAnnotationsConfig(tfds.core.BuilderConfig):
  def __init__(self, *, task: str, annotations: dict[str, str], image_root: str,
               skip_bad_examples: bool = False, images_outside_root: bool = False, **kwargs):
    if task not in TASKS:
      raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    super().__init__(version=BlipAnnotations.VERSION, **kwargs)
    self.task, self.annotations, self.image_root = task, dict(annotations), image_root
    self.skip_bad_examples, self.images_outside_root = skip_bad_examples, images_outside_root


class BlipAnnotations(tfds.core.GeneratorBasedBuilder):
  """Image-text data on local disk in BLIP's annotation JSON formats."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.1.0': 'caption task: one record per image with all its captions (was one per entry)',
                   '1.2.0': 'CMYK, 16-bit, RGBA and palette images stored as their RGB pixels (image_files); '
                            'image paths outside image_root refused unless images_outside_root'}

  def _info(self):
    task = self.builder_config.task
    features = {
        'caption': {'image': tfds.features.Image(), 'captions': tfds.features.Sequence(tfds.features.Text()),
                    'image_id': tfds.features.Text()},
        'vqa': {'image': tfds.features.Image(), 'question': tfds.features.Text(), 'question_id': np.int64,
                'answers': tfds.features.Sequence(tfds.features.Text()),
                'weights': tfds.features.Sequence(np.float32)},
        'nlvr': {'image0': tfds.features.Image(), 'image1': tfds.features.Image(),
                 'sentence': tfds.features.Text(), 'label': np.int64},
    }[task]
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(path) for split, path in self.builder_config.annotations.items()}

  def _generate_examples(self, path):
    cfg = self.builder_config
    skipped, checked = 0, {}
    images: dict[str, tuple[int, dict]] = {}  # caption task: image path -> (first entry, its record)
    for index, entry in enumerate(read_annotations(path)):
      try:
        if not isinstance(entry, dict):
          raise AnnotationError(f'expected an object, got {type(entry).__name__}')
        example = to_example(entry, cfg.task, cfg.image_root, checked, cfg.images_outside_root)
        if cfg.task == 'caption' and example['image'] in images:
          first, record = images[example['image']]
          if record['image_id'] != example['image_id']:
            raise AnnotationError(f'image {entry["image"]} has image_id {example["image_id"]!r} here but '
                                  f'{record["image_id"]!r} in entry {first}')
      except (AnnotationError, TypeError, ValueError) as e:
        if not cfg.skip_bad_examples:
          raise AnnotationError(f'{path}, entry {index}: {e}') from None
        skipped += 1
        continue
      if cfg.task != 'caption':
        yield index, _stored(example, checked)
      elif example['image'] in images:
        images[example['image']][1]['captions'] += example['captions']
      else:
        images[example['image']] = index, example
    for index, example in images.values():  # each image once, keyed by its first entry
      yield index, _stored(example, checked)
    if skipped:
      logging.warning('%s: skipped %d bad entries (skip_bad_examples=True)', path, skipped)
