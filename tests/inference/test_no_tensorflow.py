"""The inference path imports no TensorFlow: `import blip_jax`, the Predictor, and a caption from a
converted directory (numpy preprocessing, no TFDS), in a fresh interpreter."""

import subprocess
import sys

import numpy as np

from blip_jax import model_io, registry
from blip_jax.data.tokenizer import BlipTokenizer
from blip_jax.train.config_base import tiny_blip


def _run(code):
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_import_blip_jax_loads_no_tensorflow():
  _run("import blip_jax, sys; blip_jax.Predictor; assert 'tensorflow' not in sys.modules")


def test_captioning_from_a_directory_loads_no_tensorflow(tmp_path, scenes_vocab):
  tok = BlipTokenizer(scenes_vocab)
  config = registry.with_tokenizer(tiny_blip(), tok)
  model_io.save(tmp_path / 'model', registry.build('blip', 'caption', config), config, task='caption', tokenizer=tok)
  np.save(tmp_path / 'image.npy', np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
  out = _run(f"""
import sys, numpy as np, blip_jax
p = blip_jax.Predictor.from_pretrained({str(tmp_path / 'model')!r})
captions = p.caption([np.load({str(tmp_path / 'image.npy')!r})], num_beams=1, max_length=6)
assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules, sorted(
    m for m in sys.modules if m.startswith('tensorflow'))
print(len(captions))
""")
  assert out.strip() == '1'
