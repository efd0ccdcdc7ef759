"""Session-wide set-up and the fixtures the test folders share.

`tests/` mirrors `blip_jax/` (models, convert, data, train, evaluate, inference); subprocess
helpers live in `tests/helpers/`. The PyTorch references are `blip_jax.testing.torch_refs`.
"""

import os
import tempfile

# The tests never reach for the Hub: they lay out their own HF caches (tests/inference).
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One persistent XLA compilation cache for the test processes and the train.py / CapFilt / predict
# processes they start (inherited through the environment): the same tiny programs compile in
# several of them. A cache hit is the executable a compilation would produce; nothing else changes.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'blip_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


def _shared_dir(tmp_path_factory, name: str):
  """A folder every xdist worker of this run sees (the parent of the workers' temp roots)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  return root / name


@pytest.fixture(scope='session')
def scenes_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with `synthetic_scenes/tiny` in the ArrayRecord format train.py uses, built
  once for the whole run (all xdist workers)."""
  from blip_jax.data import synthetic_scenes as ss
  data_dir = _shared_dir(tmp_path_factory, 'tfds')
  with FileLock(str(data_dir) + '.lock'):
    ss.SyntheticScenes(config='tiny', data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return str(data_dir)


@pytest.fixture(scope='session')
def scenes_builder(scenes_dir):
  """The prepared `synthetic_scenes/tiny` builder."""
  from blip_jax.data import synthetic_scenes as ss
  return ss.SyntheticScenes(config='tiny', data_dir=scenes_dir, file_format='array_record')


@pytest.fixture(scope='session')
def scenes_vocab(scenes_builder) -> str:
  """The WordPiece vocab.txt synthetic_scenes builds from its own text."""
  from blip_jax.data import synthetic_scenes as ss
  return ss.vocab_path(scenes_builder)
