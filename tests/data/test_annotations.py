"""BLIP-format local datasets: the three formats, VQA answer weights, bad input, and the task
examples and loader batches made from them, checked against the source entries."""

import json

import numpy as np
import pytest
from PIL import Image

from blip_jax.data import annotations as A
from blip_jax.data import examples as ex
from blip_jax.data.loader import BatchLoader
from blip_jax.data.text import pre_caption, pre_question
from blip_jax.data.tokenizer import BlipTokenizer

WORDS = ['a', 'dog', 'cat', 'on', 'the', 'beach', 'two', 'dogs', 'red', 'ball', 'what', 'color', 'is', 'it', 'how',
         'many', 'are', 'there', 'yes', 'no', 'left', 'image', 'has', 'more', 'than', 'right', 'one', 'picture', 'of',
         '?']


def _image(path, value):
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _builder(tmp_path, name, task, entries, **kw):
  (tmp_path / 'img').mkdir(exist_ok=True)
  for i in range(3):
    _image(tmp_path / 'img' / f'{i}.png', 40 * i)
  ann = tmp_path / f'{name}.json'
  ann.write_text(json.dumps(entries))
  config = A.BlipAnnotationsConfig(name=name, task=task, annotations={'train': str(ann)},
                                   image_root=str(tmp_path / 'img'), **kw)
  builder = A.BlipAnnotations(config=config, data_dir=str(tmp_path / 'tfds'), file_format='array_record')
  builder.download_and_prepare()
  return builder


def _build(tmp_path, name, task, entries, **kw):
  source = _builder(tmp_path, name, task, entries, **kw).as_data_source('train')
  return sorted(source.__getitems__(list(range(len(source)))), key=lambda e: str(e))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
  path.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS]) + '\n')
  return BlipTokenizer(str(path))


def _batch(builder, table):
  """Every example of `table` in one batch, in table order, images as stored (uint8 -> float)."""
  source = ex.data_source(builder, 'train')
  return BatchLoader(table, source, lambda im, seed: im.astype(np.float32), len(table), shuffle=False,
                     drop_remainder=False).load(0)


def test_caption_format_with_string_or_list(tmp_path):
  out = _build(tmp_path, 'cap', 'caption', [
      {'image': '0.png', 'caption': 'a black square', 'image_id': 7},
      {'image': '1.png', 'caption': ['one', 'two'], 'image_id': 8}])
  by_id = {e['image_id'].decode(): e for e in out}
  assert [c.decode() for c in by_id['7']['captions']] == ['a black square']
  assert [c.decode() for c in by_id['8']['captions']] == ['one', 'two']
  assert by_id['8']['image'][0, 0, 0] == 40  # the right file was read


def test_one_record_per_image_whatever_the_caption_layout_and_the_retrieval_maps(tmp_path, tok, monkeypatch):
  """BLIP's coco_karpathy_train.json lists one entry per caption: the dataset still stores each
  image once (decoded once to check it), with its captions in file order."""
  entries = [{'image': '1.png', 'caption': 'A dog on the beach.', 'image_id': 'coco_1'},
             {'image': '0.png', 'caption': ['a cat', 'a red ball'], 'image_id': 'coco_0'},
             {'image': '1.png', 'caption': 'Two dogs!', 'image_id': 'coco_1'},
             {'image': '2.png', 'caption': 'the beach', 'image_id': 'coco_2'},
             {'image': '1.png', 'caption': ['a dog', 'the dog'], 'image_id': 'coco_1'}]
  opened = []
  real_open = A.image_files._opened
  monkeypatch.setattr(A.image_files, '_opened', lambda path: opened.append(path) or real_open(path))
  builder = _builder(tmp_path, 'per_caption', 'caption', entries)
  assert sorted(opened) == sorted(str(tmp_path / 'img' / f'{i}.png') for i in range(3))  # each image once
  captions = {'coco_0': ['a cat', 'a red ball'], 'coco_1': ['A dog on the beach.', 'Two dogs!', 'a dog', 'the dog'],
              'coco_2': ['the beach']}
  pixel = {'coco_0': 0, 'coco_1': 40, 'coco_2': 80}
  records = ex.read_text_fields(builder, 'train')
  assert len(records) == builder.info.splits['train'].num_examples == 3  # one record per image
  ids = [r['image_id'].decode() for r in records]
  assert sorted(ids) == sorted(captions) and all([c.decode() for c in r['captions']] == captions[i]
                                                 for r, i in zip(records, ids))
  # Retrieval: every image once, each text mapped to its own image and back.
  index = ex.retrieval_index('blip_annotations', records, tok, 12)
  assert len(index.image_records) == 3 and len(index.texts) == 7
  for image, texts in enumerate(index.img2txt):
    assert [index.texts[t] for t in texts] == [pre_caption(c, 30) for c in captions[ids[image]]]
    assert (index.txt2img[texts] == image).all()
  np.testing.assert_array_equal(index.text_ids, tok.encode(index.texts, 12)[0])
  # Training pairs: one row per caption, with its image's id and its image's pixels.
  pairs = ex.pairs('blip_annotations', records, tok, 12, prompt='a picture of ')
  batch = _batch(builder, pairs)
  texts = tok.decode(batch['text_ids'])
  assert sorted(texts) == sorted('a picture of ' + pre_caption(c, 30) for cs in captions.values() for c in cs)
  for row in range(len(pairs)):
    image_id = ids[pairs.records[row, 0]]
    assert texts[row][len('a picture of '):] in [pre_caption(c, 30) for c in captions[image_id]]
    assert (batch['image'][row] == pixel[image_id]).all()
    same_image = pairs.records[:, 0] == pairs.records[row, 0]
    assert ((batch['image_id'] == batch['image_id'][row]) == same_image).all()


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


def test_vqa_batches_hold_each_questions_tokens_answers_weights_and_image(tmp_path, tok):
  entries = [{'image': '2.png', 'question': 'What color is it?', 'question_id': 11,
              'answer': ['red', 'red', 'yes', 'red', 'two'], 'dataset': 'vqa'},
             {'image': '0.png', 'question': 'How many dogs are there?', 'question_id': 12, 'answer': 'two',
              'dataset': 'vg'},
             {'image': '1.png', 'question': 'Is it a dog', 'question_id': 13, 'answer': ['yes'] * 3 + ['no']}]
  builder = _builder(tmp_path, 'vqa_batch', 'vqa', entries)
  records = ex.read_text_fields(builder, 'train')
  table = ex.vqa('blip_annotations', records, tok, 10, 5, num_answers=2)
  batch = _batch(builder, table)
  assert batch['question_ids'].shape == (3, 10) and batch['answer_ids'].shape == (3, 2, 5)
  assert batch['weights'].dtype == np.float32 and batch['image'].shape == (3, 8, 8, 3)
  # answers kept: the num_answers heaviest, heaviest first; unused candidates weigh 0
  want = {11: (['red', 'yes'], [0.6, 0.2]), 12: (['two', ''], [0.2, 0.0]), 13: (['yes', 'no'], [0.75, 0.25])}
  pixel = {11: 80, 12: 0, 13: 40}
  for row, r in enumerate(table.records[:, 0]):
    qid = int(records[r]['question_id'])
    entry = next(e for e in entries if e['question_id'] == qid)
    assert batch['question_ids'][row, 0] == tok.cls_token_id  # (the model's multimodal encoder sets [ENC])
    assert tok.decode(batch['question_ids'][row:row + 1]) == [pre_question(entry['question'])]
    answers, weights = want[qid]
    assert tok.decode(batch['answer_ids'][row]) == answers
    assert (batch['answer_ids'][row, :, 0] == tok.bos_token_id).all()
    np.testing.assert_allclose(batch['weights'][row], weights, rtol=1e-6)
    assert (batch['answer_mask'][row].sum(-1) == [3 if a else 2 for a in answers]).all()  # [DEC] a [SEP]
    assert (batch['image'][row] == pixel[qid]).all()


def test_nlvr_batches_hold_both_images_the_statement_and_the_label(tmp_path, tok):
  entries = [{'images': ['0.png', '2.png'], 'sentence': 'The left image has more dogs.', 'label': 'True'},
             {'images': ['2.png', '1.png'], 'sentence': 'There is one red ball', 'label': False},
             {'images': ['1.png', '1.png'], 'sentence': 'two dogs', 'label': True}]
  builder = _builder(tmp_path, 'nlvr_batch', 'nlvr', entries)
  records = ex.read_text_fields(builder, 'train')
  table = ex.nlvr('blip_annotations', records, tok, 12)
  assert table.image_keys == ('image0', 'image1')
  batch = _batch(builder, table)
  assert batch['image0'].shape == batch['image1'].shape == (3, 8, 8, 3) and batch['label'].dtype == np.int32
  texts = tok.decode(batch['text_ids'])
  for row in range(3):
    entry = next(e for e in entries if pre_caption(e['sentence']) == texts[row])
    assert batch['label'][row] == int(entry['label'] in (True, 'True'))
    for j, name in enumerate(entry['images']):
      assert (batch[f'image{j}'][row] == 40 * int(name[0])).all(), (row, j)
  assert sorted(batch['label'].tolist()) == [0, 1, 1]


def test_bad_entries_name_the_file_and_index_or_are_skipped(tmp_path, caplog):
  entries = [{'image': '0.png', 'caption': 'ok'}, {'image': 'missing.png', 'caption': 'x'},
             {'caption': 'no image key'}]
  with pytest.raises(A.AnnotationError, match=r'bad\.json, entry 1: .*missing\.png: no such file'):
    _build(tmp_path, 'bad', 'caption', entries)
  out = _build(tmp_path, 'bad', 'caption', entries, skip_bad_examples=True)
  assert len(out) == 1 and 'skipped 2 bad entries' in caplog.text
  (tmp_path / 'broken.json').write_text('[{"image": ')
  with pytest.raises(A.AnnotationError, match='broken.json: not valid JSON'):
    A.read_annotations(str(tmp_path / 'broken.json'))
  (tmp_path / 'img' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(A.AnnotationError, match=r'corrupt\.json, entry 1: .*corrupt\.jpg: not a readable image'):
    _build(tmp_path, 'corrupt', 'caption', [entries[0], {'image': 'corrupt.jpg', 'caption': 'x'}])
  with pytest.raises(A.AnnotationError, match=r"missing keys \['caption'\]"):
    A.to_example({'image': '0.png'}, 'caption', str(tmp_path / 'img'))


GOOD = {'caption': [{'image': '0.png', 'caption': 'ok', 'image_id': 'a'},
                    {'image': '1.png', 'caption': 'b', 'image_id': 'b'}],
        'vqa': [{'image': '0.png', 'question': 'q', 'question_id': 1, 'answer': ['a', 'b']},
                {'image': '1.png', 'question': 'q', 'question_id': 2, 'answer': 'a', 'dataset': 'vg'}],
        'nlvr': [{'images': ['0.png', '1.png'], 'sentence': 's', 'label': True},
                 {'images': ['1.png', '2.png'], 'sentence': 's', 'label': 'False'}]}
BAD = [  # (task, bad entry, the error it gives)
    ('caption', {'image': 'missing.png', 'caption': 'x'}, r'.*missing\.png: no such file'),
    ('caption', {'image': 'corrupt.jpg', 'caption': 'x'}, r'.*corrupt\.jpg: not a readable image'),
    ('caption', {'caption': 'no image'}, r"missing keys \['image'\]"),
    ('caption', 'not an object', 'expected an object, got str'),
    ('caption', {'image': '2.png', 'caption': 7}, 'caption must be non-empty text or a non-empty list of it, got 7'),
    ('caption', {'image': '2.png', 'caption': []}, 'caption must be non-empty text or a non-empty list'),
    ('caption', {'image': '1.png', 'caption': 'x', 'image_id': 'c'},
     "image 1.png has image_id 'c' here but 'b' in entry 1"),
    ('vqa', {'image': '0.png', 'question': 'q', 'question_id': 3, 'answer': ['a', 'b'], 'dataset': 'vg'},
     r'a Visual Genome \("dataset": "vg"\) answer is one string'),
    ('vqa', {'image': '0.png', 'question': 'q', 'question_id': 'x3', 'answer': 'a'}, 'invalid literal for int'),
    ('vqa', {'image': '0.png', 'question_id': 4, 'answer': 'a'}, r"missing keys \['question'\]"),
    ('nlvr', {'images': ['0.png', '1.png'], 'sentence': 's', 'label': 'maybe'}, 'label must be true/false'),
    ('nlvr', {'images': ['0.png'], 'sentence': 's', 'label': True}, 'an nlvr entry needs exactly 2 images, got 1'),
    ('nlvr', {'images': '0.png', 'sentence': 's', 'label': True}, "image paths must be strings, got '0.png'"),
    ('nlvr', {'images': ['0.png', 'gone.png'], 'sentence': 's', 'label': True}, r'.*gone\.png: no such file'),
    ('caption', {'image': 'zero.jpg', 'caption': 'x'}, r'.*zero\.jpg: not a readable image \(cannot identify'),
    ('caption', {'image': 'truncated.jpg', 'caption': 'x'}, r'.*truncated\.jpg: not a readable image \(Truncated'),
    ('caption', {'image': '../outside.png', 'caption': 'x'}, r"image path '\.\./outside\.png' leaves the image root"),
    ('caption', {'image': '/etc/hostname', 'caption': 'x'}, r"image path '/etc/hostname' leaves the image root"),
    ('caption', {'image': '2.png', 'caption': ''}, "caption must be non-empty text or a non-empty list of it, got ''"),
    ('caption', {'image': '2.png', 'caption': ['a', ' ']}, 'caption must be non-empty text'),
    ('vqa', {'image': '0.png', 'question': '', 'question_id': 5, 'answer': 'a'}, "question must be non-empty text"),
    ('nlvr', {'images': ['0.png', '1.png'], 'sentence': ' ', 'label': True}, "sentence must be non-empty text"),
]


def _generate(tmp_path, task, entries, skip=False, **kw):
  """The builder's example generator (what download_and_prepare runs) over `entries`, with images
  0.png, 1.png, 2.png and corrupt.jpg under tmp_path/img and outside.png beside that folder."""
  (tmp_path / 'img').mkdir(exist_ok=True)
  for i in range(3):
    _image(tmp_path / 'img' / f'{i}.png', 40 * i)
  _image(tmp_path / 'outside.png', 200)
  (tmp_path / 'img' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  (tmp_path / 'img' / 'zero.jpg').write_bytes(b'')
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'img' / 'whole.jpg')
  (tmp_path / 'img' / 'truncated.jpg').write_bytes((tmp_path / 'img' / 'whole.jpg').read_bytes()[:300])
  ann = tmp_path / 'ann.json'
  ann.write_text(json.dumps(entries))
  config = A.BlipAnnotationsConfig(name='t', task=task, annotations={'train': str(ann)},
                                   image_root=str(tmp_path / 'img'), skip_bad_examples=skip, **kw)
  return list(A.BlipAnnotations(config=config, data_dir=str(tmp_path / 'tfds'))._generate_examples(str(ann)))


@pytest.mark.parametrize('task,entry,error', BAD, ids=[f'{t}-{e}' for t, _, e in BAD])
def test_each_bad_entry_is_named_or_skipped_and_counted(tmp_path, caplog, task, entry, error):
  """An error naming the file and the entry's index, or with skip_bad_examples the good entries
  and the count."""
  with pytest.raises(A.AnnotationError, match=rf'ann\.json, entry 2: {error}'):
    _generate(tmp_path, task, GOOD[task] + [entry])
  kept = _generate(tmp_path, task, GOOD[task] + [entry], skip=True)
  assert sorted(k for k, _ in kept) == [0, 1] and 'ann.json: skipped 1 bad entries' in caplog.text


def test_image_paths_outside_the_image_root_are_read_when_allowed(tmp_path):
  entries = [{'image': '../outside.png', 'caption': 'x', 'image_id': 'o'},
             {'image': str(tmp_path / 'outside.png'), 'caption': 'y', 'image_id': 'o'}]
  kept = _generate(tmp_path, 'caption', entries, images_outside_root=True)
  assert [(e['image'], e['captions']) for _, e in kept] == [(str(tmp_path / 'outside.png'), ['x', 'y'])]


def test_an_image_too_large_to_decode_safely_is_named(tmp_path, monkeypatch):
  import PIL.Image
  monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', 400)  # PIL refuses over twice this: 32 x 32 here
  with pytest.raises(A.AnnotationError, match=r'entry 0: .*whole\.jpg: too large to decode safely'):
    _generate(tmp_path, 'caption', [{'image': 'whole.jpg', 'caption': 'x'}])


def test_a_10k_word_caption_is_kept_whole_and_trained_on_its_first_30_words(tmp_path, tok):
  caption = ' '.join(WORDS[i % 10] for i in range(10_000))
  builder = _builder(tmp_path, 'long', 'caption', [{'image': '0.png', 'caption': caption, 'image_id': 'a'}])
  records = ex.read_text_fields(builder, 'train')
  assert records[0]['captions'][0].decode() == caption  # stored as written
  batch = _batch(builder, ex.pairs('blip_annotations', records, tok, 40))
  assert tok.decode(batch['text_ids']) == [' '.join(caption.split()[:30])]  # BLIP's pre_caption(max_words=30)


def test_every_kind_of_image_is_stored_as_its_documented_rgb_pixels(tmp_path):
  import tensorflow_datasets as tfds

  from blip_jax.testing import image_kinds
  kinds = image_kinds.write(tmp_path / 'img')
  entries = [{'image': name, 'caption': 'a picture', 'image_id': name} for name in kinds]
  builder = _builder(tmp_path, 'kinds', 'caption', entries)
  source = builder.as_data_source('train')
  stored = builder.as_data_source('train', decoders={'image': tfds.decode.SkipDecoding()})
  seen = set()
  for i in range(len(source)):
    name = source[i]['image_id'].decode()
    path, expected = kinds[name]
    np.testing.assert_array_equal(source[i]['image'], expected, err_msg=name)
    if name in ('rgb.png', 'photo.jpg', 'grey.jpg', 'exif_rotated.jpg'):  # kept as they are, not re-encoded
      assert stored[i]['image'] == path.read_bytes(), name
    seen.add(name)
  assert seen == set(kinds)


@pytest.mark.parametrize('content,error', [
    (b'[{"image": ', 'not valid JSON'),
    (b'{"image": "0.png"}', 'expected a JSON list of entries, got dict'),
    (b'', r'the file is empty \(expected a JSON list of entries\)'),
    ('[{"image": "0.png", "caption": "caf\u00e9"}]'.encode('latin-1'), r"not UTF-8 text \(byte 35: b'\\xe9\"}\]'\)"),
])
def test_an_unreadable_annotation_file_is_named(tmp_path, content, error):
  (tmp_path / 'a.json').write_bytes(content)
  with pytest.raises(A.AnnotationError, match=f'a.json: {error}'):
    A.read_annotations(str(tmp_path / 'a.json'))
  with pytest.raises(A.AnnotationError, match='annotation file not found: .*b.json'):
    A.read_annotations(str(tmp_path / 'b.json'))
