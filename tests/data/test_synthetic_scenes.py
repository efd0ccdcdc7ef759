"""The synthetic_scenes TFDS builder: offline, deterministic, and its text true to its images."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from blip_jax.data import synthetic_scenes as ss


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Built in TFDS's default format (tf.data's `as_dataset`; train.py reads the ArrayRecord one)."""
  builder = ss.SyntheticScenes(config='tiny', data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_builds_offline_with_splits_shapes_and_ranges(tiny):
  assert {k: v.num_examples for k, v in tiny.info.splits.items()} == {'train': 16, 'validation': 8, 'test': 8}
  ex = _examples(tiny, 'train')[0]
  assert ex['image'].shape == ex['pair_image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
  assert len(ex['captions']) == 5 and ex['label'] in (0, 1) and 1 <= ex['num_objects'] <= 3


def test_same_seed_same_examples(tiny, tmp_path):
  again = ss.SyntheticScenes(config='tiny', data_dir=str(tmp_path))
  again.download_and_prepare()
  a = sorted(_examples(tiny, 'validation'), key=lambda e: e['image_id'])
  b = sorted(_examples(again, 'validation'), key=lambda e: e['image_id'])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    assert list(x['captions']) == list(y['captions']) and x['statement'] == y['statement']


def test_text_agrees_with_the_scene():
  for seed in range(200):
    rng = np.random.default_rng([0, seed])
    objects, background = ss.sample_scene(rng)
    image = ss.draw(objects, background, 64)
    for obj in objects:  # the object's colour is at its position
      x, y = (int(c * 64) for c in ss.POSITIONS[obj.position])
      np.testing.assert_array_equal(image[y, x], ss.COLORS[obj.color])
    qa = {t: a for _, a, t in ss.questions(objects, rng)}
    assert qa['count'] == str(len(objects))
    if 'color' in qa:
      assert qa['color'] in {o.color for o in objects}
    caption = ss.captions(objects, background, np.random.default_rng(seed))
    assert any(objects[0].color in c for c in caption)
    assert not any(('striped' in c) != background['striped'] for c in caption if 'background' in c)
    other, _ = ss.sample_scene(np.random.default_rng([1, seed]))
    text, label = ss.statement(objects, other, rng)
    assert label == _truth(text, objects, other), text


def _truth(text, left, right):
  """The statement's truth, worked out here from the scenes rather than by the generator."""
  words = text.split()
  if 'more objects' in text:
    first, second = (left, right) if words[1] == 'left' else (right, left)
    return len(first) > len(second)
  color, shape = words[-2], words[-1]
  counts = [any(o.color == color and o.shape == shape for o in scene) for scene in (left, right)]
  return all(counts) if text.startswith('both') else sum(counts) == 1


def test_statements_are_balanced():
  records = [ss.scene_record(0, 0, i) for i in range(600)]
  assert 0.4 < np.mean([r['label'] for r in records]) < 0.6
  for kind in ('more objects', 'exactly one'):  # 'both' is rarely true of two random scenes
    labels = [r['label'] for r in records if kind in r['statement']]
    assert 0.3 < np.mean(labels) < 0.7, kind


def test_vocabulary_written_with_the_dataset_covers_its_text(tiny):
  from blip_jax.data.tokenizer import BlipTokenizer
  tok = BlipTokenizer(ss.vocab_path(tiny))
  unk = tok.tokenizer.convert_tokens_to_ids('[UNK]')
  for split in ('train', 'test'):  # test-split words are covered through the character pieces
    for ex in _examples(tiny, split):
      texts = [t.decode() for t in [*ex['captions'], *ex['questions'], *ex['answers'], ex['statement']]]
      ids, _ = tok.encode(texts, max_length=40)
      assert unk not in ids, texts
  assert tok.vocab_size == len(pathlib.Path(ss.vocab_path(tiny)).read_text().split()) + 2  # + [DEC], [ENC]
