"""Train (or evaluate) a BLIP / BLIP-2 / CLIP model: `python train.py [--config configs/X.py[:arg]]
[--workdir DIR] [--config.field=value ...]`. With no flags: configs/default.py into runs/default.

Multi-host: every host runs the same command; `jax.distributed.initialize()` is called when the
environment names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or
with --multihost (TPU pods and SLURM, where JAX finds them itself). See the README.
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(HERE, 'configs', 'default.py'), 'training config file')
flags.DEFINE_string('workdir', None, 'checkpoints, metrics.jsonl, TensorBoard events (default runs/<config name>)')
flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize() (auto-detected cluster)')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  if FLAGS.multihost or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    env = {k: os.environ[v] for k, v in [('coordinator_address', 'JAX_COORDINATOR_ADDRESS')] if v in os.environ}
    if 'JAX_NUM_PROCESSES' in os.environ:
      env.update(num_processes=int(os.environ['JAX_NUM_PROCESSES']), process_id=int(os.environ['JAX_PROCESS_ID']))
    jax.distributed.initialize(**env)
  # Libraries (orbax, TFDS) log every save and read at INFO through absl: keep their warnings only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('blip_jax').setLevel(logging.INFO)
  from blip_jax.train.loop import train_and_evaluate
  config_name = os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename.split(':')[0]))[0]
  workdir = FLAGS.workdir or os.path.join('runs', config_name)
  train_and_evaluate(FLAGS.config, workdir)


if __name__ == '__main__':
  app.run(main)
