"""Data parallelism: a 1-D device mesh with the batch on a 'data' axis.

Two drivers run the *same* train step: `jax.jit` with NamedShardings (the recommended way;
parameters replicated, batch sharded, works across hosts) and `jax.pmap` (kept because users
ask for it; single host). Per-example randomness comes from (seed, step, global example index),
so both produce the same numbers for the same global batch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fer_jax.errors import ConfigError

DATA_AXIS = 'data'
PARALLEL_MODES = ('jit', 'pmap')


def maybe_initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Starts jax.distributed only when a multi-host setup is present or asked for.

  The bare `jax.distributed.initialize()` raises on a plain single machine, so it is only called
  with explicit flags, or when the environment names a cluster: SLURM with several tasks, a
  Cloud TPU VM (JAX reads the pod's workers from the VM metadata; one worker is a cluster of
  one), or JAX's own coordinator variable. Besides joining the hosts, it starts JAX's preemption
  service, which the train loop uses to stop all hosts at the same step on SIGTERM.
  """
  if coordinator_address or num_processes > 1:
    kwargs = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes or None,
                  process_id=None if process_id < 0 else process_id)
    logging.info('jax.distributed.initialize(%s)', kwargs)
    jax.distributed.initialize(**kwargs)
    return
  env = os.environ
  multi_host = (
      int(env.get('SLURM_NTASKS', '1')) > 1
      or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
      or bool(env.get('JAX_COORDINATOR_ADDRESS')))
  if multi_host:
    logging.info('multi-host environment detected: jax.distributed.initialize()')
    jax.distributed.initialize()
  elif on_cloud_tpu_vm():
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # e.g. a notebook TPU VM without pod metadata
      logging.warning('TPU VM without a pod description (%s): running single-host', e)


def on_cloud_tpu_vm() -> bool:
  """TPU chips (/dev/accel* up to v4, /dev/vfio/<n> from v5e) and libtpu installed."""
  chips = glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and importlib.util.find_spec('libtpu') is not None


def make_mesh() -> Mesh:
  """All devices (of all processes) on one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, what: str = 'config.train.batch_size') -> None:
  """Clear errors for a global batch that cannot be split evenly over devices and hosts."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch < n_dev:
    raise ConfigError(f'{what}={global_batch} is smaller than the {n_dev} devices: '
                      f'use at least {n_dev}')
  if global_batch % n_dev:
    raise ConfigError(f'{what}={global_batch} is not divisible by the {n_dev} devices '
                      f'({n_proc} process(es)): use a multiple of {n_dev}')


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> global arrays sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_pmap(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """(B, ...) -> (local_devices, B / local_devices, ...) for a pmapped step."""
  n = jax.local_device_count()
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def replicate_for_pmap(tree: Any) -> Any:
  """One copy per local device, stacked on a leading axis (pmap's layout)."""
  n = jax.local_device_count()
  host = to_host(tree)
  return jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape).copy(), host)


def unreplicate_from_pmap(tree: Any) -> Any:
  return jax.tree.map(lambda x: x[0], tree)


def to_host(tree: Any) -> Any:
  """Fetches (replicated) arrays to numpy, also when they span several hosts."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
