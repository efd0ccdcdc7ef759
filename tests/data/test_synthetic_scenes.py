"""synthetic_scenes: built once with the `tiny` config; stored examples checked against the
scene they describe, independently of the generator's own text code where possible."""

import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from blip_jax.data import synthetic_scenes as ss
from blip_jax.data.text import pre_caption, pre_question
from blip_jax.data.tokenizer import BlipTokenizer

TINY = next(c for c in ss.SyntheticScenes.BUILDER_CONFIGS if c.name == 'tiny')
WORD_POSITION = {'left': 'left', 'right': 'right', 'top': 'top', 'bottom': 'bottom',
                 'center': 'center', 'middle': 'center'}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = ss.prepare('tiny', data_dir)
  splits = {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
            for split in ss.SPLITS}
  return data_dir, builder, splits


def text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def all_examples(splits):
  return [ex for split in ss.SPLITS for ex in splits[split]]


def test_splits_shapes_dtypes(built):
  _, builder, splits = built
  assert {s: len(v) for s, v in splits.items()} == {'train': 12, 'val': 4, 'test': 4}
  assert builder.data_dir.endswith('synthetic_scenes/tiny/1.0.0')
  for split, examples in splits.items():
    assert sorted(int(ex['image_id']) for ex in examples) == list(range(len(examples)))
    for ex in examples:
      for image in (ex['image'], ex['nlvr2']['image_right']):
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert image.std() > 5  # not blank
      assert ex['captions'].shape == (5,) and ex['questions']['question'].shape == (6,)
      n = len(ex['objects']['shape'])
      assert 1 <= n <= 3 and 1 <= len(ex['nlvr2']['objects']['shape']) <= 3
      assert len(set(ex['objects']['position'])) == n  # distinct positions
      assert 0 <= ex['objects']['color'].min() and ex['objects']['color'].max() < len(ss.COLORS)
      assert ex['nlvr2']['label'] in (0, 1)


def test_stored_examples_equal_the_seeded_generator(built):
  _, _, splits = built
  for split in ss.SPLITS:
    for ex in splits[split]:
      i = int(ex['image_id'])
      want = ss.make_example(TINY, split, i)
      again = ss.make_example(TINY, split, i)
      np.testing.assert_array_equal(want['image'], again['image'])  # pure function of the seed
      np.testing.assert_array_equal(ex['image'], want['image'])      # PNG is lossless
      np.testing.assert_array_equal(ex['nlvr2']['image_right'], want['nlvr2']['image_right'])
      assert [text(c) for c in ex['captions']] == want['captions']
      assert [text(q) for q in ex['questions']['question']] == want['questions']['question']
      assert [text(a) for a in ex['questions']['answer']] == want['questions']['answer']
      for key in ('shape', 'color', 'size', 'position'):
        assert list(ex['objects'][key]) == want['objects'][key]
      assert text(ex['nlvr2']['sentence']) == want['nlvr2']['sentence']
  # another seed, other scenes; splits differ from each other
  other = ss.SyntheticScenesConfig(name='other', resolution=32, seed=1)
  assert ss.make_example(other, 'train', 0)['captions'] != ss.make_example(TINY, 'train',
                                                                            0)['captions']
  assert ss.make_example(TINY, 'val', 0)['captions'] != ss.make_example(TINY, 'train',
                                                                         0)['captions']


def check_pixels(image, scene):
  """Each object's colour at its position (up to the +-10 colour jitter); a corner, which no
  object reaches, is background: far from every object colour."""
  for o in scene.objects:
    x, y = (int(v * image.shape[0]) for v in ss.CENTERS[o.position])
    patch = image[y - 1:y + 2, x - 1:x + 2].astype(int)
    assert np.abs(patch - np.array(ss.RGB[o.color])).max(-1).min() <= 12, o
  corner = image[0, 0].astype(int)
  assert min(np.abs(corner - np.array(rgb)).max() for rgb in ss.RGB.values()) > 30


def test_images_show_the_scene(built):
  _, _, splits = built
  for ex in all_examples(splits):
    check_pixels(ex['image'], ss.scene_from_example(ex))
    check_pixels(ex['nlvr2']['image_right'], ss.scene_from_example(ex, right=True))
  # and at the default resolution, on more scenes (no build needed)
  cfg = ss.SyntheticScenesConfig(name='x', resolution=64)
  for i in range(40):
    ex = ss.make_example(cfg, 'train', i)
    check_pixels(ex['image'], ss.scene_from_example(ex))


def test_captions_name_every_object(built):
  _, _, splits = built
  one_object = 0
  for ex in all_examples(splits):
    scene = ss.scene_from_example(ex)
    captions = [pre_caption(text(c), 30) for c in ex['captions']]
    assert len(set(captions)) == len(captions)  # five different phrasings
    for cap in captions:
      words = cap.replace(',', ' ').split()
      for o in scene.objects:
        assert f'{o.color} {o.shape}' in cap, (cap, o)
      assert sum(w in ss.COLORS for w in words) == len(scene.objects), cap
      if 'in total' not in cap and re.search(r'\b(two|three) (objects|shapes)', cap):
        assert ss.NUMBER_WORDS[len(scene.objects)] in words
    one_object += len(scene.objects) == 1
  assert one_object > 0  # the one-object case above was exercised


def refer(phrase, scene):
  """The objects an English referring phrase of the questions picks out."""
  m = re.fullmatch(r'the object (?:on|at|in|near) the (\w+)(?: side)?', phrase)
  if m:
    return [o for o in scene.objects if o.position == WORD_POSITION[m.group(1)]]
  m = re.fullmatch(r'the (\w+) object', phrase)
  if m:
    return [o for o in scene.objects if o.color == m.group(1)]
  m = re.fullmatch(r'the (\w+) (\w+)', phrase)
  if m:
    return [o for o in scene.objects if (o.color, o.shape) == m.groups()]
  m = re.fullmatch(r'the (\w+)', phrase)
  return [o for o in scene.objects if o.shape == m.group(1)]


def expected_answer(question, scene):
  """Answers a cleaned question from the stored scene, without the generator's code."""
  if m := re.fullmatch(r'how many (objects|shapes) are (?:there|in the image)\?', question):
    return str(len(scene.objects))
  if m := re.fullmatch(r'how many (\w+) objects are there\?', question):
    return str(scene.count(color=m.group(1)))
  if m := re.fullmatch(r'how many (\w+)s are in the picture\?', question):
    return str(scene.count(shape=m.group(1)))
  if m := re.fullmatch(r'is there an? (\w+) (\w+)\?', question):
    return 'yes' if scene.count(*m.groups()) else 'no'
  if m := re.fullmatch(r'(what color|what shape|which shape|where) is (.+)\?', question):
    (obj,) = refer(m.group(2), scene)  # exactly one object: the question is unambiguous
    return {'what color': obj.color, 'what shape': obj.shape, 'which shape': obj.shape,
            'where': obj.position}[m.group(1)]
  if m := re.fullmatch(r'is (.+) (\w+)\?', question):
    (obj,) = refer(m.group(1), scene)
    value = m.group(2)
    return 'yes' if value in (obj.color, obj.size) else 'no'
  raise AssertionError(f'unexpected question form: {question!r}')


def test_vqa_answers_follow_from_the_scene(built):
  _, _, splits = built
  types = []
  for ex in all_examples(splits):
    scene = ss.scene_from_example(ex)
    qs = ex['questions']
    for q, a, t in zip(qs['question'], qs['answer'], qs['type']):
      q, a = pre_question(text(q)), text(a)
      assert expected_answer(q, scene) == a, (q, a, scene)
      types.append(ss.QUESTION_TYPES[t])
      if ss.QUESTION_TYPES[t] == 'count':
        assert a.isdigit()
      if q in ('how many objects are there?', 'how many shapes are in the image?'):
        assert int(a) == len(ex['objects']['shape'])
  assert set(types) == set(ss.QUESTION_TYPES)


def nlvr2_truth(sentence, left, right):
  """The truth of a statement, worked out from the two scenes."""
  has = lambda scene, **kw: scene.count(**kw) > 0
  nl, nr = len(left.objects), len(right.objects)
  if m := re.fullmatch(r'both images contain an? (\w+) object', sentence):
    return has(left, color=m.group(1)) and has(right, color=m.group(1))
  if m := re.fullmatch(r'only the left image contains an? (\w+) object', sentence):
    return has(left, color=m.group(1)) and not has(right, color=m.group(1))
  if m := re.fullmatch(r'exactly one image contains an? (\w+)', sentence):
    return has(left, shape=m.group(1)) != has(right, shape=m.group(1))
  if m := re.fullmatch(r'there is an? (\w+) in the right image', sentence):
    return has(right, shape=m.group(1))
  if sentence == 'the left image has more objects than the right image':
    return nl > nr
  if sentence == 'both images have the same number of objects':
    return nl == nr
  if m := re.fullmatch(r'there are (\w+) objects in total', sentence):
    return ss.NUMBER_WORDS.index(m.group(1)) == nl + nr
  raise AssertionError(f'unexpected statement: {sentence!r}')


def test_nlvr2_labels_are_true_statements(built):
  _, _, splits = built
  for ex in all_examples(splits):
    left, right = ss.scene_from_example(ex), ss.scene_from_example(ex, right=True)
    sentence = pre_caption(text(ex['nlvr2']['sentence']))
    assert nlvr2_truth(sentence, left, right) == bool(ex['nlvr2']['label']), sentence
  # labels are balanced (about half true) over many pairs
  labels = [ss.make_example(TINY, 'train', i)['nlvr2']['label'] for i in range(200)]
  assert 0.4 < np.mean(labels) < 0.6


def test_vocabulary_covers_every_text(built):
  data_dir, builder, splits = built
  path = ss.vocab_path('tiny', data_dir)
  assert path.startswith(builder.data_dir) and path.endswith('vocab.txt')
  n = len(open(path).read().split('\n')) - 1
  tok = ss.tokenizer('tiny', data_dir)
  assert isinstance(tok, BlipTokenizer)
  assert (tok.bos_token_id, tok.enc_token_id, tok.vocab_size) == (n, n + 1, n + 2)
  texts = []
  for ex in all_examples(splits):
    texts += [pre_caption(text(c)) for c in ex['captions']]
    texts += [pre_question(text(q)) for q in ex['questions']['question']]
    texts += [text(a) for a in ex['questions']['answer']]
    texts.append(pre_caption(text(ex['nlvr2']['sentence'])))
  texts.append('a picture of ')  # the captioning prompt
  ids, mask = tok.encode(texts, max_length=40, first_token='dec')
  assert mask[:, -1].sum() == 0  # nothing was truncated
  assert not np.any(ids == tok.tokenizer.unk_token_id)
  assert (ids[:, 0] == tok.bos_token_id).all()
  # scene words are single tokens of their own
  for word in ss.COLORS + ss.SHAPES + ss.POSITIONS:
    assert tok.tokenizer.tokenize(word) == [word]


def test_vocab_path_of_an_unbuilt_dataset_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='not built'):
    ss.vocab_path('tiny', str(tmp_path))


def test_grid_command(built, tmp_path):
  data_dir, _, splits = built
  out = tmp_path / 'grid.png'
  assert ss.main(['--out', str(out), '--data_dir', data_dir, '--config', 'tiny', '--num', '6',
                  '--columns', '3']) == 0
  grid = np.asarray(Image.open(out).convert('RGB'))
  # 3 columns of 160 px cells with 8 px gaps; the first cell is the first train image x5
  assert grid.shape[1] == 3 * 168 + 8
  first = np.asarray(Image.fromarray(splits['train'][0]['image']).resize(
      (160, 160), Image.Resampling.NEAREST))
  np.testing.assert_array_equal(grid[8:168, 8:168], first)
  # caption text is drawn (dark pixels) under the image
  assert (grid[170:200, 8:168] < 100).any()


def test_module_runs_as_a_script(built, tmp_path):
  data_dir, _, _ = built
  out = tmp_path / 'grid.png'
  result = subprocess.run([sys.executable, '-m', 'blip_jax.data.synthetic_scenes', '--out',
                           str(out), '--data_dir', data_dir, '--config', 'tiny', '--num', '4'],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'wrote' in result.stdout and Image.open(out).size[0] == 4 * 168 + 8
