"""The global batch and learning rate from a per-device batch, resolved once JAX knows its devices.

A config file is read before `jax.distributed` starts, so it cannot ask how many devices there
are; `config.train.per_device_batch_size` (> 0) says "this many per device", and the learning
rate, given for `lr_base_batch`, is scaled to the resulting global batch B by `lr_scaling`:
'sqrt' (lr x sqrt(B / base), the rule for adaptive optimizers such as adamw: Malladi et al.
2022, and what this project's batch sweeps on CPU support), 'linear' (lr x B / base, Goyal et
al. 2017, for SGD with a warmup), or 'none'. Warmup should then be given in steps
(`warmup_steps`), since an epoch is only a few steps at large B.
"""

from __future__ import annotations

import math

import ml_collections
from absl import logging

from fer_jax.errors import ConfigError

LR_SCALINGS = ('sqrt', 'linear', 'none')


def resolve(config: ml_collections.ConfigDict, device_count: int) -> ml_collections.ConfigDict:
  """`config` itself when no per-device batch is set, else a copy with the batch and LR set."""
  per_device = int(config.train.get('per_device_batch_size', 0))
  if not per_device:
    return config
  if per_device < 0:
    raise ConfigError(f'config.train.per_device_batch_size={per_device}: must be positive (or 0)')
  rule = config.train.get('lr_scaling', 'sqrt')
  if rule not in LR_SCALINGS:
    raise ConfigError(f'config.train.lr_scaling={rule!r}: expected one of {LR_SCALINGS}')
  base = int(config.train.get('lr_base_batch', 32))
  if base <= 0:
    raise ConfigError(f'config.train.lr_base_batch={base}: must be positive')
  batch = per_device * device_count
  factor = {'sqrt': math.sqrt(batch / base), 'linear': batch / base, 'none': 1.0}[rule]
  out = ml_collections.ConfigDict(config.to_dict())
  out.train.batch_size = batch
  out.train.learning_rate = float(config.train.learning_rate) * factor
  out.train.per_device_batch_size = 0  # resolved: the saved config states the real values
  logging.info(
    'per-device batch %d x %d devices = global batch %d; learning rate %.3g x %.3g '
    '(%s rule from batch %d) = %.3g',
    per_device,
    device_count,
    batch,
    config.train.learning_rate,
    factor,
    rule,
    base,
    out.train.learning_rate,
  )
  return out
