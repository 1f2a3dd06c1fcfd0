"""Train and evaluate: `python launch.py --config experiments/base.py --workdir runs/base`.

Config overrides: `--config.train.epochs=5 --config.data.path=...`. Multi-host: run the same
command on every host; `jax.distributed` starts when the environment (SLURM, Cloud TPU VM) or
the --coordinator_address/--num_processes/--process_id flags say so.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', 'experiments/base.py', 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results.json go.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', '', 'host:port of process 0 (multi-host).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (multi-host).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from fer_jax import logs

  logs.quiet_library_logs()  # orbax's and grain's INFO records only with --verbosity=1
  from fer_jax import parallel, runtime, time_budget, train  # after flag parsing: XLA_FLAGS
  from fer_jax.errors import FerJaxError

  runtime.inline_cpu_dispatch()  # before JAX starts its CPU client
  workdir = _WORKDIR.value or f'runs/{_config_name()}'
  try:
    parallel.maybe_initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    train.train_and_evaluate(_CONFIG.value, workdir, started=time_budget.process_start_time())
  except FerJaxError as e:
    if logging.get_verbosity() > logging.INFO:  # --verbosity=1 or more: show the traceback
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes (unknown key, wrong type) as one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config_flags overrides
    message = str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').strip('"')
    print(f'error: bad --config override: {message}', file=sys.stderr)
  sys.exit(1)


def _config_name() -> str:
  return os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0]


if __name__ == '__main__':
  from fer_jax import runtime

  tuned = runtime.tuned_environ()
  if tuned is not None:  # glibc reads its malloc settings at start-up: run again with them
    os.execve(sys.executable, [sys.executable] + sys.argv, tuned)
  app.run(main, flags_parser=_parse_flags)
