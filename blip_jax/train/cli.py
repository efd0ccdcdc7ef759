"""`blip-jax-train` (or `python train.py`): train or evaluate as a config says.

    blip-jax-train                                          # the built-in default (configs/default.py)
    blip-jax-train --config retrieval:coco --workdir runs/coco --config.init_from=ckpt/blip_base
    python train.py --config configs/retrieval.py:coco ...  # the same, by file

`--config` is a config file (`path.py[:arg]`) or the name of one of blip_jax's (`NAME[:arg]`,
`blip_jax/configs/NAME.py`); any field can be overridden (`--config.field=value`). Multi-host:
every host runs the same command; `jax.distributed.initialize()` is called when the environment
names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or with
--multihost (TPU pods and SLURM, where JAX finds them itself).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
config_flags.DEFINE_config_file('config', os.path.join(CONFIGS, 'default.py'), 'training config: file or name')
flags.DEFINE_string('workdir', None, 'checkpoints, metrics.jsonl, TensorBoard events (default runs/<config name>)')
flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize() (auto-detected cluster)')
FLAGS = flags.FLAGS


def resolve_config_names(argv: list[str]) -> list[str]:
  """`--config NAME[:arg]` -> the path of blip_jax's config NAME, when NAME is not a file."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == '--config' and i + 1 < len(argv):
      arg, i = f'--config={argv[i + 1]}', i + 1
    if arg.startswith('--config='):
      path, sep, rest = arg[len('--config='):].partition(':')
      packaged = os.path.join(CONFIGS, f'{path}.py')
      if not os.path.exists(path) and os.path.exists(packaged):
        arg = f'--config={packaged}{sep}{rest}'
    out.append(arg)
    i += 1
  return out


def _main(argv):
  del argv
  from blip_jax import distributed
  distributed.initialize(FLAGS.multihost)
  # Libraries (orbax, TFDS) log every save and read at INFO through absl: keep their warnings only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('blip_jax').setLevel(logging.INFO)
  from blip_jax import cli
  from blip_jax.train import checkpoints, lock
  from blip_jax.train.loop import train_and_evaluate
  config_name = os.path.splitext(os.path.basename(FLAGS['config'].config_filename.split(':')[0]))[0]
  workdir = FLAGS.workdir or os.path.join('runs', config_name)
  # Bad config values, data, disks and the workdir's state are one `error:` line, not a traceback.
  status = cli.main(lambda _: train_and_evaluate(FLAGS.config, workdir), [],
                    also=(lock.WorkdirLocked, checkpoints.NoUsableCheckpoint))
  if status:
    sys.exit(status)


def _unknown_field(e: AttributeError, argv: list[str]) -> str | None:
  """ml_collections' error for a `--config.x=y` naming no field, as one line (None: another error)."""
  text = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  return f'no such config field: {text} (overrides: {" ".join(overrides)})' if overrides else None


def main(argv=None) -> None:
  argv = resolve_config_names(list(sys.argv if argv is None else argv))
  try:
    app.run(_main, argv=argv)
  except AttributeError as e:
    if FLAGS.is_parsed():  # raised by the run itself: a bug, with its traceback
      raise
    message = _unknown_field(e, argv)  # raised while parsing --config.x=y
    if message is None:
      raise
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)
