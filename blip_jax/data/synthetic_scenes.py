"""`synthetic_scenes`: a procedural image-text dataset for BLIP's tasks, built offline.

Every image shows 1 to `max_objects` objects, each with a shape (circle, square, triangle,
diamond), a color (red, green, blue, yellow, purple, orange), a size (small, large) and a position
(left, right, top, bottom, center; distinct within an image), on a plain or textured gray
background. No (color, shape) pair repeats within an image. From the scene description come
captions in varied phrasings, VQA questions with answers, and an NLVR2-style statement about
this image and a second one. Everything is a pure function of `(config.seed, split, index)`:
the same config gives the same bytes on any machine, and nothing is downloaded.

Features of one example (`R` = `config.resolution`, `C` = `config.num_captions`,
`Q` = `config.num_questions`, `N` = number of objects):

| key | type | meaning |
|---|---|---|
| `image` | uint8 `[R, R, 3]` | the scene |
| `image_id` | int64 | index within its split |
| `captions` | `C` strings | raw English sentences, capitalised, ending in `.`; clean with `pre_caption` |
| `objects/shape`, `objects/color`, `objects/size`, `objects/position` | int64 `[N]` | class labels, names in `SHAPES`, `COLORS`, `SIZES`, `POSITIONS` |
| `background` | int64 | 0 plain, 1 textured (`BACKGROUNDS`) |
| `questions/question` | `Q` strings | e.g. `What color is the circle?`; clean with `pre_question` |
| `questions/answer` | `Q` strings | one lower-case word: a color, a shape, a position, a digit, `yes` / `no` |
| `questions/type` | int64 `[Q]` | `QUESTION_TYPES`: color, shape, count, position, yes_no |
| `nlvr2/image_right` | uint8 `[R, R, 3]` | a second scene; `image` is the left image |
| `nlvr2/objects/...` | int64 `[M]` | the second scene's objects, as `objects` |
| `nlvr2/background` | int64 | the second scene's background |
| `nlvr2/sentence` | string | a statement about the pair, e.g. `Both images contain a red object.` |
| `nlvr2/label` | int64 | 1 if the statement is true, 0 if false (about half each) |

Splits `train`, `val`, `test`. Configs (`BUILDER_CONFIGS`): `default` (500 / 100 / 100 images at
64 px, builds in about 15 s on 2 CPU cores), `tiny` (12 / 4 / 4 at 32 px, for tests), `large`
(10000 / 1000 / 1000 at 224 px). Any other size: `SyntheticScenes(config=SyntheticScenesConfig(
name='mine', resolution=96, num_train=2000, seed=3))`.

While building, the WordPiece vocabulary of all captions, questions, answers and statements is
written to `<builder.data_dir>/vocab.txt` (see `vocab_path`, `tokenizer`).

Build and look at it:

    python -m blip_jax.data.synthetic_scenes --out grid.png [--data_dir DIR] [--config tiny]

In Python:

    from blip_jax.data import synthetic_scenes
    builder = synthetic_scenes.prepare('default', data_dir)      # builds once, then reuses
    ds = builder.as_dataset(split='train')
    tok = synthetic_scenes.tokenizer('default', data_dir)        # BlipTokenizer on its vocab
"""

from __future__ import annotations

import sys

if __name__ == '__main__':
  # `python -m blip_jax.data.synthetic_scenes`: run the command line from the module under its
  # package name, which TFDS needs (it registers the builder once and looks up its package).
  from blip_jax.data.synthetic_scenes import main
  sys.exit(main())

import argparse
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from blip_jax.data.tokenizer import BlipTokenizer
from blip_jax.data.vocab import build_wordpiece_vocab

SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange')
SIZES = ('small', 'large')
POSITIONS = ('left', 'right', 'top', 'bottom', 'center')
BACKGROUNDS = ('plain', 'textured')
QUESTION_TYPES = ('color', 'shape', 'count', 'position', 'yes_no')
SPLITS = ('train', 'val', 'test')

RGB = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (50, 90, 230),
    'yellow': (240, 215, 40),
    'purple': (150, 60, 190),
    'orange': (250, 140, 20),
}
# Object centres as fractions of the image side (x, y), and radii (fractions of the side).
CENTERS = {'left': (0.2, 0.5), 'right': (0.8, 0.5), 'top': (0.5, 0.2), 'bottom': (0.5, 0.8),
           'center': (0.5, 0.5)}
RADII = {'small': 0.075, 'large': 0.13}
_JITTER = 0.015
_SUPERSAMPLE = 4
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                'ten')


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  """Size and content of a `synthetic_scenes` build. The seed fixes every example."""
  resolution: int = 64
  num_train: int = 500
  num_val: int = 100
  num_test: int = 100
  max_objects: int = 3
  num_captions: int = 5
  num_questions: int = 6
  seed: int = 0

  def num_examples(self, split: str) -> int:
    return {'train': self.num_train, 'val': self.num_val, 'test': self.num_test}[split]


# --------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  position: str


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  background: str

  def count(self, color: str | None = None, shape: str | None = None) -> int:
    return sum((color is None or o.color == color) and (shape is None or o.shape == shape)
               for o in self.objects)


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
  """1..max_objects objects at distinct positions, with distinct (color, shape) pairs."""
  if not 1 <= max_objects <= len(POSITIONS):
    raise ValueError(f'max_objects must be in [1, {len(POSITIONS)}], got {max_objects}')
  n = int(rng.integers(1, max_objects + 1))
  positions = rng.permutation(len(POSITIONS))[:n]
  pairs = rng.permutation(len(COLORS) * len(SHAPES))[:n]
  objects = tuple(
      Obj(shape=SHAPES[int(p) % len(SHAPES)], color=COLORS[int(p) // len(SHAPES)],
          size=SIZES[int(rng.integers(len(SIZES)))], position=POSITIONS[int(pos)])
      for p, pos in zip(pairs, positions))
  return Scene(objects=objects, background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def _choice(rng, options):
  return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# Text

_SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
_POSITION_PHRASES = {
    'left': ('on the left', 'on the left side', 'at the left'),
    'right': ('on the right', 'on the right side', 'at the right'),
    'top': ('at the top', 'near the top'),
    'bottom': ('at the bottom', 'near the bottom'),
    'center': ('in the center', 'in the middle'),
}
_BACKGROUND_PHRASES = {'plain': ('plain', 'plain gray', 'uniform'),
                       'textured': ('textured', 'patterned')}


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _join(parts) -> str:
  parts = list(parts)
  if len(parts) == 1:
    return parts[0]
  return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _noun_phrase(o: Obj, rng, with_size: bool, with_position: bool) -> str:
  words = ([_choice(rng, _SIZE_WORDS[o.size])] if with_size else []) + [o.color, o.shape]
  phrase = f'{_article(words[0])} {" ".join(words)}'
  if with_position:
    phrase += ' ' + _choice(rng, _POSITION_PHRASES[o.position])
  return phrase


def _plural(shape: str, n: int) -> str:
  return shape if n == 1 else shape + 's'


def _capitalize(s: str) -> str:
  return s[0].upper() + s[1:]


# Caption templates: every one names the color and the shape of every object.
def _caption(template: int, scene: Scene, rng) -> str:
  n = len(scene.objects)
  size, pos = bool(rng.integers(2)), bool(rng.integers(2))
  things = _join(_noun_phrase(o, rng, size, pos) for o in scene.objects)
  detailed = _join(_noun_phrase(o, rng, True, True) for o in scene.objects)
  bg = _choice(rng, _BACKGROUND_PHRASES[scene.background])
  number = NUMBER_WORDS[n]
  noun = _choice(rng, ('object', 'shape'))
  if template == 0:
    s = things
  elif template == 1:
    s = f'there is {things}' if n == 1 else f'there are {number} {noun}s: {things}'
  elif template == 2:
    s = f'{_choice(rng, ("a picture", "an image", "a drawing"))} of {things}'
  elif template == 3:
    s = f'{things} on {_article(bg)} {bg} background'
  elif template == 4:
    s = f'{_article(bg)} {bg} background with {detailed}'
  elif template == 5:
    s = (f'{number} {_plural(noun, n)}: {detailed}' if n > 1 else f'a single {noun}, {detailed}')
  else:
    s = f'this image shows {things}'
  return _capitalize(s) + '.'


_NUM_CAPTION_TEMPLATES = 7


def captions(scene: Scene, rng, num_captions: int) -> list[str]:
  """`num_captions` captions, each from a different template while there are templates left."""
  order = list(rng.permutation(_NUM_CAPTION_TEMPLATES))
  while len(order) < num_captions:
    order += list(rng.permutation(_NUM_CAPTION_TEMPLATES))
  return [_caption(int(t), scene, rng) for t in order[:num_captions]]


def _refer(o: Obj, scene: Scene, rng, known: str) -> str:
  """A phrase that singles out `o` without naming its `known` attribute (the one asked for)."""
  options = []
  if known != 'shape' and scene.count(shape=o.shape) == 1:
    options.append(f'the {o.shape}')
  if known != 'color' and scene.count(color=o.color) == 1:
    options.append(f'the {o.color} object')
  if known not in ('shape', 'color'):
    options.append(f'the {o.color} {o.shape}')
  if known != 'position':
    options.append(f'the object {_choice(rng, _POSITION_PHRASES[o.position])}')
  return _choice(rng, options)


def _question(qtype: str, scene: Scene, rng) -> tuple[str, str]:
  o = scene.objects[int(rng.integers(len(scene.objects)))]
  if qtype == 'color':
    return f'What color is {_refer(o, scene, rng, "color")}?', o.color
  if qtype == 'shape':
    q = _choice(rng, ('What shape is {}?', 'Which shape is {}?'))
    return q.format(_refer(o, scene, rng, 'shape')), o.shape
  if qtype == 'count':
    kind = int(rng.integers(3))
    if kind == 0:
      q = _choice(rng, ('How many objects are there?', 'How many shapes are in the image?'))
      return q, str(len(scene.objects))
    if kind == 1:
      color = _choice(rng, COLORS)
      return f'How many {color} objects are there?', str(scene.count(color=color))
    shape = _choice(rng, SHAPES)
    return f'How many {shape}s are in the picture?', str(scene.count(shape=shape))
  if qtype == 'position':
    return f'Where is {_refer(o, scene, rng, "position")}?', o.position
  if qtype == 'yes_no':
    kind = int(rng.integers(3))
    if kind == 0:   # a (color, shape) pair, present or not with equal chance
      if rng.integers(2):
        color, shape = o.color, o.shape
      else:
        absent = [(c, s) for c in COLORS for s in SHAPES if scene.count(c, s) == 0]
        color, shape = _choice(rng, absent)
      answer = scene.count(color, shape) > 0
      return f'Is there {_article(color)} {color} {shape}?', 'yes' if answer else 'no'
    if kind == 1:   # the color of a referred object
      color = o.color if rng.integers(2) else _choice(rng, [c for c in COLORS if c != o.color])
      return f'Is {_refer(o, scene, rng, "color")} {color}?', 'yes' if color == o.color else 'no'
    size = _choice(rng, SIZES)
    return (f'Is {_refer(o, scene, rng, "size")} {size}?', 'yes' if size == o.size else 'no')
  raise ValueError(qtype)


def questions(scene: Scene, rng, num_questions: int) -> list[tuple[str, str, str]]:
  """(question, answer, type) triples: the types in `QUESTION_TYPES` order, cycling."""
  out = []
  for i in range(num_questions):
    qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
    out.append((*_question(qtype, scene, rng), qtype))
  return out


def nlvr2_candidates(left: Scene, right: Scene) -> list[tuple[str, bool]]:
  """Every statement the templates can make about the pair, with its truth."""
  out = []
  for c in COLORS:
    a, b = left.count(color=c) > 0, right.count(color=c) > 0
    out.append((f'Both images contain {_article(c)} {c} object.', a and b))
    out.append((f'Only the left image contains {_article(c)} {c} object.', a and not b))
  for s in SHAPES:
    a, b = left.count(shape=s) > 0, right.count(shape=s) > 0
    out.append((f'Exactly one image contains {_article(s)} {s}.', a != b))
    out.append((f'There is {_article(s)} {s} in the right image.', b))
  nl, nr = len(left.objects), len(right.objects)
  out.append(('The left image has more objects than the right image.', nl > nr))
  out.append(('Both images have the same number of objects.', nl == nr))
  for k in range(2, 2 * len(POSITIONS) + 1):
    out.append((f'There are {NUMBER_WORDS[k]} objects in total.', nl + nr == k))
  return out


def nlvr2_statement(left: Scene, right: Scene, rng) -> tuple[str, bool]:
  """A statement true or false with equal chance (when the pair allows both)."""
  candidates = nlvr2_candidates(left, right)
  want = bool(rng.integers(2))
  pool = [c for c in candidates if c[1] == want] or candidates
  return pool[int(rng.integers(len(pool)))]


# --------------------------------------------------------------------------------------------
# Images


def _background(scene: Scene, size: int, rng) -> np.ndarray:
  level = int(rng.integers(50, 121))
  if scene.background == 'plain':
    return np.full((size, size, 3), level, np.uint8)
  y, x = np.mgrid[:size, :size]
  kind = int(rng.integers(3))
  period = size / float(rng.integers(5, 10))
  if kind == 0:   # checkerboard
    pattern = ((x // period).astype(int) + (y // period).astype(int)) % 2
  elif kind == 1:   # diagonal stripes
    pattern = (((x + y) / period).astype(int)) % 2
  else:   # dots
    pattern = ((np.hypot(x % period - period / 2, y % period - period / 2)) < period / 4)
  img = level + 35 * pattern.astype(np.float32)
  img = np.repeat(img[..., None], 3, -1) + rng.integers(-8, 9, (1, 1, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene, resolution: int, rng) -> np.ndarray:
  """The scene as uint8 `[resolution, resolution, 3]`, drawn 4x larger and downsampled."""
  big = resolution * _SUPERSAMPLE
  canvas = Image.fromarray(_background(scene, big, rng))
  draw = ImageDraw.Draw(canvas)
  for o in scene.objects:
    cx, cy = (np.asarray(CENTERS[o.position]) + rng.uniform(-_JITTER, _JITTER, 2)) * big
    r = RADII[o.size] * big
    fill = tuple(int(v) for v in np.clip(np.asarray(RGB[o.color]) + rng.integers(-10, 11, 3), 0,
                                         255))
    if o.shape == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == 'square':
      h = 0.85 * r
      draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif o.shape == 'triangle':
      draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)],
                   fill=fill)
    elif o.shape == 'diamond':
      draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
      raise ValueError(o.shape)
  small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(small, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Examples


def _rngs(config: SyntheticScenesConfig, split: str, index: int):
  key = [int(config.seed), SPLITS.index(split), int(index)]
  # Separate streams for the descriptions and the pixels, so texts can be made without images.
  return np.random.default_rng(key + [0]), np.random.default_rng(key + [1])


def _scene_and_texts(config: SyntheticScenesConfig, split: str, index: int):
  rng, _ = _rngs(config, split, index)
  left = sample_scene(rng, config.max_objects)
  right = sample_scene(rng, config.max_objects)
  caps = captions(left, rng, config.num_captions)
  qas = questions(left, rng, config.num_questions)
  statement = nlvr2_statement(left, right, rng)
  return left, right, caps, qas, statement


def example_texts(config: SyntheticScenesConfig, split: str, index: int) -> list[str]:
  """Every string of one example (captions, questions, answers, statement); no drawing."""
  _, _, caps, qas, (sentence, _) = _scene_and_texts(config, split, index)
  return caps + [q for q, _, _ in qas] + [a for _, a, _ in qas] + [sentence]


def _objects_feature(scene: Scene) -> dict:
  return {
      'shape': [SHAPES.index(o.shape) for o in scene.objects],
      'color': [COLORS.index(o.color) for o in scene.objects],
      'size': [SIZES.index(o.size) for o in scene.objects],
      'position': [POSITIONS.index(o.position) for o in scene.objects],
  }


def make_example(config: SyntheticScenesConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, as the builder stores it (class labels as ints)."""
  left, right, caps, qas, (sentence, label) = _scene_and_texts(config, split, index)
  _, pixel_rng = _rngs(config, split, index)
  return {
      'image': render(left, config.resolution, pixel_rng),
      'image_id': int(index),
      'captions': caps,
      'objects': _objects_feature(left),
      'background': BACKGROUNDS.index(left.background),
      'questions': {
          'question': [q for q, _, _ in qas],
          'answer': [a for _, a, _ in qas],
          'type': [QUESTION_TYPES.index(t) for _, _, t in qas],
      },
      'nlvr2': {
          'image_right': render(right, config.resolution, pixel_rng),
          'objects': _objects_feature(right),
          'background': BACKGROUNDS.index(right.background),
          'sentence': sentence,
          'label': int(label),
      },
  }


def scene_from_example(example: dict, right: bool = False) -> Scene:
  """The `Scene` of a stored (numpy) example, or of its NLVR2 right image."""
  ex = example['nlvr2'] if right else example
  objs = ex['objects']
  return Scene(
      objects=tuple(Obj(SHAPES[int(s)], COLORS[int(c)], SIZES[int(z)], POSITIONS[int(p)])
                    for s, c, z, p in zip(objs['shape'], objs['color'], objs['size'],
                                          objs['position'])),
      background=BACKGROUNDS[int(ex['background'])])


# --------------------------------------------------------------------------------------------
# The TFDS builder

VOCAB_FILE = 'vocab.txt'


def _object_features():
  return tfds.features.Sequence({
      'shape': tfds.features.ClassLabel(names=SHAPES),
      'color': tfds.features.ClassLabel(names=COLORS),
      'size': tfds.features.ClassLabel(names=SIZES),
      'position': tfds.features.ClassLabel(names=POSITIONS),
  })


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes with captions, VQA and NLVR2 statements (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      SyntheticScenesConfig(name='default', description='500/100/100 images at 64 px.'),
      SyntheticScenesConfig(name='tiny', description='12/4/4 images at 32 px, for tests.',
                            resolution=32, num_train=12, num_val=4, num_test=4),
      SyntheticScenesConfig(name='large', description='10000/1000/1000 images at 224 px.',
                            resolution=224, num_train=10000, num_val=1000, num_test=1000),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  # Where TFDS looks for checksums / metadata files next to the code. Given explicitly: TFDS's
  # own inference needs the `importlib_resources` package, which is not always installed.
  code_path = epath.Path(os.path.abspath(__file__))
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    image = tfds.features.Image(shape=(c.resolution, c.resolution, 3), encoding_format='png')
    return self.dataset_info_from_configs(
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'image': image,
            'image_id': np.int64,
            'captions': tfds.features.Sequence(tfds.features.Text(), length=c.num_captions),
            'objects': _object_features(),
            'background': tfds.features.ClassLabel(names=BACKGROUNDS),
            'questions': tfds.features.Sequence({
                'question': tfds.features.Text(),
                'answer': tfds.features.Text(),
                'type': tfds.features.ClassLabel(names=QUESTION_TYPES),
            }, length=c.num_questions),
            'nlvr2': tfds.features.FeaturesDict({
                'image_right': tfds.features.Image(shape=(c.resolution, c.resolution, 3),
                                                   encoding_format='png'),
                'objects': _object_features(),
                'background': tfds.features.ClassLabel(names=BACKGROUNDS),
                'sentence': tfds.features.Text(),
                'label': tfds.features.ClassLabel(names=('false', 'true')),
            }),
        }),
        homepage='https://github.com/salesforce/BLIP',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    write_vocab(c, self.data_path / VOCAB_FILE)
    return {split: self._generate_examples(split) for split in SPLITS if c.num_examples(split)}

  def _generate_examples(self, split):
    for index in range(self.builder_config.num_examples(split)):
      yield index, make_example(self.builder_config, split, index)


def write_vocab(config: SyntheticScenesConfig, path) -> str:
  """The WordPiece vocabulary of every text of every split of `config`, written to `path`."""
  texts = [t for split in SPLITS for i in range(config.num_examples(split))
           for t in example_texts(config, split, i)]
  # BLIP's captioning prompt, so that prompting works with this vocabulary too.
  texts.append('a picture of ')
  return build_wordpiece_vocab(texts, os.fspath(path))


def _builder(config='default', data_dir=None) -> SyntheticScenes:
  if isinstance(config, SyntheticScenes):
    return config
  return SyntheticScenes(config=config, data_dir=data_dir)


def prepare(config='default', data_dir=None) -> SyntheticScenes:
  """The builder for `config` (a name in `BUILDER_CONFIGS` or a `SyntheticScenesConfig`), built
  under `data_dir` (TFDS's default when None) unless it is there already."""
  builder = _builder(config, data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def vocab_path(config='default', data_dir=None) -> str:
  """Path of the built dataset's `vocab.txt` (a builder can be passed as `config`). Written again
  from the config if the dataset is built but the file is missing."""
  builder = _builder(config, data_dir)
  path = os.path.join(builder.data_dir, VOCAB_FILE)
  if not os.path.exists(path):
    if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
      raise FileNotFoundError(
          f'{path}: synthetic_scenes/{builder.builder_config.name} is not built under '
          f'{builder.data_dir_root}; run synthetic_scenes.prepare({builder.builder_config.name!r}, '
          f'data_dir) first')
    write_vocab(builder.builder_config, path)
  return path


def tokenizer(config='default', data_dir=None) -> BlipTokenizer:
  """A `BlipTokenizer` on the built dataset's vocabulary."""
  return BlipTokenizer(vocab_path(config, data_dir))


# --------------------------------------------------------------------------------------------
# Command line: a grid of samples


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
    return ImageFont.load_default()


def sample_grid(examples, *, columns: int = 4, cell: int = 160) -> Image.Image:
  """A PIL image: each example's image (scaled to `cell` px) above its first caption."""
  examples = list(examples)
  if not examples:
    raise ValueError('sample_grid: no examples')
  font = _font(12)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  line_height = int(probe.textbbox((0, 0), 'Ag', font=font)[3]) + 3
  blocks = []
  for ex in examples:
    caption = ex['captions'][0]
    caption = caption.decode() if isinstance(caption, bytes) else str(caption)
    lines, line = [], ''
    for word in caption.split():
      trial = f'{line} {word}'.strip()
      if line and probe.textlength(trial, font=font) > cell - 8:
        lines.append(line)
        line = word
      else:
        line = trial
    lines.append(line)
    blocks.append((ex['image'], lines))
  text_rows = max(len(lines) for _, lines in blocks)
  columns = min(columns, len(blocks))
  rows = -(-len(blocks) // columns)
  cell_h = cell + 6 + text_rows * line_height + 6
  grid = Image.new('RGB', (columns * (cell + 8) + 8, rows * cell_h + 8), 'white')
  draw = ImageDraw.Draw(grid)
  for i, (image, lines) in enumerate(blocks):
    x = 8 + (i % columns) * (cell + 8)
    y = 8 + (i // columns) * cell_h
    grid.paste(Image.fromarray(np.asarray(image)).resize((cell, cell), Image.Resampling.NEAREST),
               (x, y))
    for j, line in enumerate(lines):
      draw.text((x, y + cell + 6 + j * line_height), line, fill='black', font=font)
  return grid


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m blip_jax.data.synthetic_scenes',
      description='Build synthetic_scenes (if needed) and write a PNG grid of samples with '
                  'their first caption.')
  parser.add_argument('--out', required=True, help='PNG file to write')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  parser.add_argument('--config', default='default',
                      choices=[c.name for c in SyntheticScenes.BUILDER_CONFIGS])
  parser.add_argument('--split', default='train', choices=SPLITS)
  parser.add_argument('--num', type=int, default=16, help='number of samples')
  parser.add_argument('--columns', type=int, default=4)
  args = parser.parse_args(argv)
  builder = prepare(args.config, args.data_dir)
  examples = tfds.as_numpy(builder.as_dataset(split=args.split, shuffle_files=False).take(args.num))
  grid = sample_grid(examples, columns=args.columns)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  grid.save(args.out)
  print(f'wrote {args.out} ({grid.size[0]}x{grid.size[1]}) from {builder.data_dir}; '
        f'vocabulary: {vocab_path(builder)}')
  return 0

