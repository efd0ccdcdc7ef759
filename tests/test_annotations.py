"""BLIP-format local datasets: the three formats, VQA answer weights, and bad input."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from blip_jax.data import annotations as A


def _image(path, value):
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _build(tmp_path, name, task, entries, **kw):
  (tmp_path / 'img').mkdir(exist_ok=True)
  for i in range(3):
    _image(tmp_path / 'img' / f'{i}.png', 40 * i)
  ann = tmp_path / f'{name}.json'
  ann.write_text(json.dumps(entries))
  config = A.BlipAnnotationsConfig(name=name, task=task, annotations={'train': str(ann)},
                                   image_root=str(tmp_path / 'img'), **kw)
  builder = A.BlipAnnotations(config=config, data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  return sorted(tfds.as_numpy(builder.as_dataset(split='train')), key=lambda e: str(e))


def test_caption_format_with_string_or_list(tmp_path):
  out = _build(tmp_path, 'cap', 'caption', [
      {'image': '0.png', 'caption': 'a black square', 'image_id': 7},
      {'image': '1.png', 'caption': ['one', 'two'], 'image_id': 8}])
  by_id = {e['image_id'].decode(): e for e in out}
  assert [c.decode() for c in by_id['7']['captions']] == ['a black square']
  assert [c.decode() for c in by_id['8']['captions']] == ['one', 'two']
  assert by_id['8']['image'][0, 0, 0] == 40  # the right file was read


def test_vqa_answer_weights_follow_the_originals(tmp_path):
  answers, weights = A.vqa_answer_weights(['2', '2', 'two', '2'])
  assert answers == ['2', 'two'] and np.allclose(weights, [0.75, 0.25])
  assert A.vqa_answer_weights('yes', 'vg') == (['yes'], [0.2])  # Visual Genome: one answer, weight 0.2
  assert A.vqa_answer_weights('yes') == (['yes'], [1.0])
  with pytest.raises(A.AnnotationError, match='Visual Genome'):
    A.vqa_answer_weights(['yes', 'no'], 'vg')
  out = _build(tmp_path, 'vqa', 'vqa', [{'image': '2.png', 'question': 'what?', 'question_id': 3,
                                         'answer': ['a', 'b', 'a', 'a'], 'dataset': 'vqa'}])
  assert [a.decode() for a in out[0]['answers']] == ['a', 'b'] and np.allclose(out[0]['weights'], [0.75, 0.25])


def test_nlvr_format(tmp_path):
  out = _build(tmp_path, 'nlvr', 'nlvr', [{'images': ['0.png', '2.png'], 'sentence': 's', 'label': 'True'}])
  assert out[0]['label'] == 1 and out[0]['image1'][0, 0, 0] == 80


def test_bad_entries_name_the_file_and_index_or_are_skipped(tmp_path, caplog):
  entries = [{'image': '0.png', 'caption': 'ok'}, {'image': 'missing.png', 'caption': 'x'},
             {'caption': 'no image key'}]
  with pytest.raises(A.AnnotationError, match=r'bad\.json, entry 1: image not found: .*missing\.png'):
    _build(tmp_path, 'bad', 'caption', entries)
  out = _build(tmp_path, 'bad', 'caption', entries, skip_bad_examples=True)
  assert len(out) == 1 and 'skipped 2 bad entries' in caplog.text
  (tmp_path / 'broken.json').write_text('[{"image": ')
  with pytest.raises(A.AnnotationError, match='broken.json: not valid JSON'):
    A.read_annotations(str(tmp_path / 'broken.json'))
  (tmp_path / 'img' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(A.AnnotationError, match=r'corrupt\.json, entry 1: cannot read image .*corrupt\.jpg'):
    _build(tmp_path, 'corrupt', 'caption', [entries[0], {'image': 'corrupt.jpg', 'caption': 'x'}])
  with pytest.raises(A.AnnotationError, match=r"missing keys \['caption'\]"):
    A.to_example({'image': '0.png'}, 'caption', str(tmp_path / 'img'))
