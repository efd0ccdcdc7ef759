"""The process-group flags of the tests' multi-process scripts (loader_devices.py,
distributed_step.py) and the join they make: N local processes, each with simulated CPU devices,
talking over gloo as hosts of one job would."""

import argparse

import jax


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--port', type=int, default=0, help="process 0's coordinator port on localhost")


def join(args: argparse.Namespace) -> None:
  """Joins the job when there is more than one process; call before JAX touches a device."""
  if args.num_processes > 1:
    # No persistent compilation cache: a process that finds its programs there while the other
    # compiles them would wait at the first collective past gloo's 30 s deadline.
    jax.config.update('jax_enable_compilation_cache', False)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'localhost:{args.port}', args.num_processes, args.process_id)
