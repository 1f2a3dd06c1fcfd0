"""The uint8 training split resident on the devices; each step ships only its int32 indices.

Why: feeding from the host costs a gather and a host->device copy of B x 48 x 48 bytes per
step (~7 ms at B = 4096 on this CPU), on every host, in the accelerator's critical path. FER2013's
training split is 28,709 x 48 x 48 bytes = 66 MB (83 MB with every split), so it is put on every
device once, replicated over the mesh, and each step sends 4 bytes per example: the indices of
the global batch from `epoch_order.EpochBatches` (each process sends its own contiguous slice).
The jitted step gathers its rows in front of the same train step (`gather`): with the split
replicated and the indices sharded on 'data', each device gathers its own rows, with no
communication.

The rule (`use_resident`), `data.on_device`:
- 'auto' (default): on for GPU/TPU (non-CPU backends) under parallel='jit' when the split fits
  `data.on_device_max_mb` per device (default 2048 MB); off on CPU, where the "device" is the
  host's own memory and the numpy gather runs on a prefetch thread beside the step;
- 'on': required (a ConfigError names the reason when it is not possible: pmap, or too large);
- 'off': host feeding.
A split larger than the budget is fed from the host; a sharded resident split (each device a
slice, rows exchanged per step) is not implemented, since no dataset this project trains on
needs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fer_jax.data.types import Split
from fer_jax.errors import ConfigError
from fer_jax.parallel import DATA_AXIS

SETTINGS = ('auto', 'on', 'off')
DEFAULT_MAX_MB = 2048.0


def split_bytes(split: Split) -> int:
  """Bytes the resident copy of `split` takes on each device (images, labels, soft labels)."""
  arrays = [split.images, split.labels]
  if split.soft_labels is not None:
    arrays.append(split.soft_labels)
  return sum(int(a.nbytes) for a in arrays)


def setting(data_cfg: Any) -> str:
  """`data.on_device` as one of SETTINGS (True/False from a Python config: 'on'/'off')."""
  value = data_cfg.get('on_device', 'auto')
  if isinstance(value, bool):
    value = 'on' if value else 'off'
  if value not in SETTINGS:
    raise ConfigError(f'config.data.on_device={value!r}: expected one of {SETTINGS}')
  return value


def use_resident(data_cfg: Any, *, backend: str, mode: str, nbytes: int) -> bool:
  """Whether the training split goes on the devices (the rule in the module docstring)."""
  value = setting(data_cfg)
  if value == 'off':
    return False
  budget = float(data_cfg.get('on_device_max_mb', DEFAULT_MAX_MB)) * 2**20
  if value == 'auto':
    return backend != 'cpu' and mode == 'jit' and nbytes <= budget
  if mode != 'jit':
    raise ConfigError(
      f"config.data.on_device='on' needs config.parallel='jit' (got {mode!r}); use 'auto' or 'off'"
    )
  if nbytes > budget:
    raise ConfigError(
      f"config.data.on_device='on': the training split takes {nbytes / 2**20:.0f} MB per device, "
      f'more than config.data.on_device_max_mb={budget / 2**20:.0f}; raise it or use "off"'
    )
  return True


def put_split(split: Split, mesh: Mesh) -> dict[str, jax.Array]:
  """The split's arrays replicated on every device of `mesh` (every process holds the whole
  split in memory already; each places its own devices' copies)."""
  arrays = {'image': split.images, 'label': split.labels}
  if split.soft_labels is not None:
    arrays['soft_label'] = split.soft_labels
  sharding = NamedSharding(mesh, P())
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    for k, v in arrays.items()
  }


def gather(data: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
  """The batch of rows `index` (inside the jitted step; the rows follow index's sharding)."""
  return {k: jnp.take(v, index, axis=0, mode='clip') for k, v in data.items()}


def index_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """(B,) indices, or (K, B) for K steps per dispatch: the batch axis on 'data'."""
  return NamedSharding(mesh, P(*([None] * (ndim - 1)), DATA_AXIS))


def put_indices(feed: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """This process's slice of the indices ({'index': (B/P,) or (K, B/P) int32}) -> the step's feed.

  One process: the numpy array itself, which the jitted step's `in_shardings` place from C++;
  a `jax.device_put` first was a large share of the loop's host time per step (measured in
  benchmarks/README.md, train_loop section). Several processes: the global array
  assembled from each process's slice (jit cannot take a process-local numpy slice).
  """
  if jax.process_count() == 1:
    return feed
  index = feed['index']
  sharding = index_sharding(mesh, index.ndim)
  return {'index': jax.make_array_from_process_local_data(sharding, index)}
