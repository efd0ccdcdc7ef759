"""`synthetic_scenes`: a procedurally generated image-text dataset that exists on any machine.

Every example is a scene of 1 to 3 objects (shape, colour, size, position) on a plain or striped
background, drawn deterministically from a seed, with:
- `captions`: 5 captions in varied phrasings;
- `questions` / `answers` / `question_types`: VQA pairs (color, shape, count, position, yes/no);
- `pair_image`, `statement`, `label`: an NLVR2-style example (this scene and the next one, a
  statement about both, true or false).

    import tensorflow_datasets as tfds
    import blip_jax.data.synthetic_scenes  # registers the builder
    ds = tfds.load('synthetic_scenes/small', split='train', data_dir=...)

Building also writes `vocab.txt` (a WordPiece vocabulary of the training split's text) next to
the data; `vocab_path(builder)` finds it and `BlipTokenizer(vocab_path(builder))` tokenizes.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from blip_jax.data.vocab import build_wordpiece_vocab

VOCAB_FILE = 'vocab.txt'

SHAPES = ('circle', 'square', 'triangle')
COLORS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
          'yellow': (235, 210, 40), 'purple': (140, 60, 180), 'orange': (245, 140, 30)}
SIZES = ('small', 'large')
POSITIONS = {'left': (0.2, 0.5), 'right': (0.8, 0.5), 'top': (0.5, 0.2), 'bottom': (0.5, 0.8),
             'center': (0.5, 0.5)}
NUMBERS = ('zero', 'one', 'two', 'three')


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  color: str
  size: str
  position: str

  def phrase(self, article=True) -> str:
    return f"{'a ' if article else ''}{self.size} {self.color} {self.shape}"


def sample_scene(rng: np.random.Generator) -> tuple[list[SceneObject], dict]:
  n = int(rng.integers(1, 4))
  positions = rng.choice(list(POSITIONS), size=n, replace=False)
  objects = [SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(SIZES)),
                         str(p)) for p in positions]
  background = {'striped': bool(rng.random() < 0.5), 'tone': int(rng.integers(150, 250))}
  return objects, background


def draw(objects, background, resolution: int) -> np.ndarray:
  tone = background['tone']
  image = Image.new('RGB', (resolution, resolution), (tone, tone, tone))
  canvas = ImageDraw.Draw(image)
  if background['striped']:
    step = max(resolution // 8, 2)
    for x in range(0, resolution, 2 * step):
      canvas.rectangle([x, 0, x + step - 1, resolution], fill=(tone - 30, tone - 30, tone - 30))
  for obj in objects:
    cx, cy = (c * resolution for c in POSITIONS[obj.position])
    r = resolution * (0.14 if obj.size == 'large' else 0.08)
    box = [cx - r, cy - r, cx + r, cy + r]
    color = COLORS[obj.color]
    if obj.shape == 'circle':
      canvas.ellipse(box, fill=color)
    elif obj.shape == 'square':
      canvas.rectangle(box, fill=color)
    else:
      canvas.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
  return np.asarray(image)


def _listing(objects) -> str:
  parts = [o.phrase() for o in objects]
  return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def captions(objects, background, rng: np.random.Generator) -> list[str]:
  first = objects[0]
  n = len(objects)
  noun = 'object' if n == 1 else 'objects'
  options = [
      f'a picture of {_listing(objects)}',
      f'{_listing(objects)} on a {"striped" if background["striped"] else "plain"} background',
      f'there {"is" if n == 1 else "are"} {NUMBERS[n]} {noun} in the image',
      f'{first.phrase()} at the {first.position}',
      f'a {first.color} {first.shape} and {n - 1} other {"shape" if n == 2 else "shapes"}' if n > 1
      else f'only one {first.color} {first.shape}',
      f'an image showing {NUMBERS[n]} {"shape" if n == 1 else "shapes"}: '
      + ', '.join(f'{o.color} {o.shape}' for o in objects),
  ]
  order = rng.permutation(len(options))[:5]
  return [options[i] for i in order]


def questions(objects, rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """(question, answer, type) pairs whose answers follow from the scene."""
  qa = [('how many objects are there?', str(len(objects)), 'count')]
  target = objects[int(rng.integers(len(objects)))]
  if sum(o.shape == target.shape for o in objects) == 1:
    qa.append((f'what color is the {target.shape}?', target.color, 'color'))
  if sum(o.color == target.color for o in objects) == 1:
    qa.append((f'what shape is the {target.color} object?', target.shape, 'shape'))
    qa.append((f'where is the {target.color} {target.shape}?', target.position, 'position'))
  probe = SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), 'small', 'center')
  present = any(o.shape == probe.shape and o.color == probe.color for o in objects)
  qa.append((f'is there a {probe.color} {probe.shape}?', 'yes' if present else 'no', 'yes/no'))
  return qa


def statement(left, right, rng: np.random.Generator) -> tuple[str, bool]:
  """An NLVR2-style statement about two scenes and whether it is true.

  The label is drawn first (true half the time), then a form among those that can have that
  label, then a statement of that form with it, so labels are balanced and the wording gives
  them away as little as the scenes allow.
  """
  want = bool(rng.random() < 0.5)
  has = lambda scene, color, shape: any(o.color == color and o.shape == shape for o in scene)
  pairs = [(c, s) for c in COLORS for s in SHAPES]
  forms = [
      [(f'the {a} image has more objects than the {b} image', len(x) > len(y))
       for a, x, b, y in (('left', left, 'right', right), ('right', right, 'left', left))],
      [(f'both images contain a {c} {s}', has(left, c, s) and has(right, c, s)) for c, s in pairs],
      [(f'exactly one image contains a {c} {s}', has(left, c, s) != has(right, c, s)) for c, s in pairs],
  ]
  forms = [[o for o in form if o[1] == want] for form in forms]
  forms = [form for form in forms if form]
  form = forms[int(rng.integers(len(forms)))]
  return form[int(rng.integers(len(form)))]


class SyntheticScenesConfig(tfds.core.BuilderConfig):
  def __init__(self, *, num_train: int, num_eval: int, resolution: int, seed: int = 0, **kwargs):
    super().__init__(version=tfds.core.Version('1.1.0'), **kwargs)
    self.num_train, self.num_eval, self.resolution, self.seed = num_train, num_eval, resolution, seed


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with captions, VQA and NLVR2-style statements (no download)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'small: 2000 / 200 / 200 scenes (200 validation images for retrieval R@k)'}
  BUILDER_CONFIGS = [
      SyntheticScenesConfig(name='small', description='2000 train / 200 val / 200 test scenes at 64 px',
                            num_train=2000, num_eval=200, resolution=64),
      SyntheticScenesConfig(name='tiny', description='16 / 8 / 8 scenes at 32 px, for tests',
                            num_train=16, num_eval=8, resolution=32),
      SyntheticScenesConfig(name='large', description='20000 / 1000 / 1000 scenes at 128 px',
                            num_train=20000, num_eval=1000, resolution=128),
  ]
  DEFAULT_CONFIG_NAME = 'small'

  def _info(self):
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(r, r, 3)),
        'image_id': np.int64,
        'captions': tfds.features.Sequence(tfds.features.Text()),
        'questions': tfds.features.Sequence(tfds.features.Text()),
        'answers': tfds.features.Sequence(tfds.features.Text()),
        'question_types': tfds.features.Sequence(tfds.features.Text()),
        'num_objects': np.int64,
        'pair_image': tfds.features.Image(shape=(r, r, 3)),
        'statement': tfds.features.Text(),
        'label': np.int64,
    }))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    # The vocabulary of everything the training split says, so the dataset is usable offline.
    texts = [t for i in range(cfg.num_train) for t in scene_record(cfg.seed, 0, i)['texts']]
    build_wordpiece_vocab(texts, os.path.join(self.data_dir, VOCAB_FILE))
    return {'train': self._generate_examples(cfg.num_train, offset=0),
            'validation': self._generate_examples(cfg.num_eval, offset=1_000_000),
            'test': self._generate_examples(cfg.num_eval, offset=2_000_000)}

  def _generate_examples(self, count: int, offset: int):
    cfg = self.builder_config
    for i in range(count):
      r = scene_record(cfg.seed, offset, i)
      yield i, {
          'image': draw(r['objects'], r['background'], cfg.resolution),
          'image_id': offset + i,
          'captions': r['captions'],
          'questions': [q for q, _, _ in r['qa']], 'answers': [a for _, a, _ in r['qa']],
          'question_types': [t for _, _, t in r['qa']],
          'num_objects': len(r['objects']),
          'pair_image': draw(*r['pair'], cfg.resolution),
          'statement': r['statement'], 'label': int(r['label']),
      }


def scene_record(seed: int, offset: int, i: int) -> dict:
  """Everything about scene `i` of a split, from its seeds alone (no image drawn)."""
  scene = lambda j: sample_scene(np.random.default_rng([seed, offset + j]))
  objects, background = scene(i)
  pair = scene(i + 1)  # the next scene (one past the end for the last)
  rng = np.random.default_rng([seed, offset + i, 1])
  qa = questions(objects, rng)
  text, label = statement(objects, pair[0], rng)
  caps = captions(objects, background, rng)
  return {'objects': objects, 'background': background, 'pair': pair, 'qa': qa, 'statement': text,
          'label': label, 'captions': caps,
          'texts': caps + [q for q, _, _ in qa] + [a for _, a, _ in qa] + [text]}


def vocab_path(builder: SyntheticScenes) -> str:
  """The WordPiece vocabulary written with the dataset (for `BlipTokenizer`)."""
  return os.path.join(builder.data_dir, VOCAB_FILE)


def sample_grid(examples, columns: int = 4, cell: int = 160) -> Image.Image:
  """A PNG-ready grid of images, each with its first caption underneath."""
  rows = (len(examples) + columns - 1) // columns
  text_height = 28
  grid = Image.new('RGB', (columns * cell, rows * (cell + text_height)), 'white')
  canvas = ImageDraw.Draw(grid)
  for k, ex in enumerate(examples):
    x, y = (k % columns) * cell, (k // columns) * (cell + text_height)
    grid.paste(Image.fromarray(ex['image']).resize((cell, cell), Image.NEAREST), (x, y))
    caption = ex['captions'][0]
    caption = caption.decode() if isinstance(caption, bytes) else caption
    canvas.text((x + 3, y + cell + 2), caption[:28], fill='black')
    canvas.text((x + 3, y + cell + 14), caption[28:56], fill='black')
  return grid

