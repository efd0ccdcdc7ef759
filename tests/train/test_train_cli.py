"""`train.py` as a user runs it: fine-tuning on your own files in BLIP's annotation format, with
`--config.x=y` overrides (the README's "Your own data" command at toy size), then resuming."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip_jax.evaluate.caption_metrics import meteor_available

ROOT = pathlib.Path(__file__).parents[2]
WORDS = ['a', 'red', 'green', 'blue', 'square', 'circle', 'on', 'the', 'left', 'right', 'picture', 'of']


def _own_data(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'images').mkdir()
  entries = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / 'images' / f'{i}.jpg')
    words = rng.choice(WORDS[:10], 5)
    entries.append({'image': f'{i}.jpg', 'caption': [' '.join(words), ' '.join(words[::-1])], 'image_id': f'img{i}'})
  for split, part in (('train', entries[:8]), ('val', entries[8:])):
    (tmp_path / f'{split}.json').write_text(json.dumps(part))
  (tmp_path / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS]) + '\n')


def _train(tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, str(ROOT / 'train.py'), '--config', str(ROOT / 'configs' / 'caption.py:tiny'),
       '--workdir', str(tmp_path / 'run'), '--config.data.name=blip_annotations', '--config.data.task=caption',
       f'--config.data.annotations.train={tmp_path / "train.json"}',
       f'--config.data.annotations.validation={tmp_path / "val.json"}',
       f'--config.data.image_root={tmp_path / "images"}', f'--config.data.vocab={tmp_path / "vocab.txt"}',
       f'--config.data.data_dir={tmp_path / "tfds"}', '--config.data.config_name=mine', '--config.batch_size=4',
       *overrides], capture_output=True, text=True, cwd=ROOT)


def test_fine_tune_on_own_annotation_files_then_resume(tmp_path):
  _own_data(tmp_path)
  first = _train(tmp_path, '--config.num_steps=2')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'caption: ' in first.stdout and '16 examples' in first.stdout and 'eval: caption/bleu1' in first.stdout
  assert ('caption/meteor' in first.stdout) == meteor_available()  # configs/caption.py asks for METEOR
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if 'train/loss' in l] == [1, 2]
  # The same command with more steps continues from the step-2 checkpoint.
  second = _train(tmp_path, '--config.num_steps=4')
  assert second.returncode == 0, second.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if 'train/loss' in l] == [1, 2, 3, 4]
  # A typo in a field name is refused, naming the field.
  bad = _train(tmp_path, '--config.optim.learning_rate=1e-3')
  assert bad.returncode != 0 and 'learning_rate' in bad.stderr


@pytest.mark.parametrize('override,message', [
    ('--config.nmu_steps=3', 'no such config field: \'nmu_steps\' Did you mean "num_steps"'),
    ('--config.optim.schedule=bogus', "optim.schedule must be one of ('cosine', 'step', 'warmup_cosine', 'constant'), "
                                      "got 'bogus'"),
    ('--config.data.name=blip_annotations', 'data.name=blip_annotations needs data.task, data.annotations, '
                                            'data.image_root'),
])
def test_a_bad_config_is_one_error_line(tmp_path, scenes_dir, override, message):
  out = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--config', 'default:tiny', '--workdir',
                        str(tmp_path / 'run'), f'--config.data.data_dir={scenes_dir}', override],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 2 and f'error: {message}' in out.stderr and 'Traceback' not in out.stderr, out.stderr[-3000:]
