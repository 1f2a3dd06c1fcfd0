"""Train metrics summed on the device, fetched once per log window; eval/checkpoint cadence.

Why: fetching each step's metrics one scalar at a time is ~150 blocking device->host transfers
per 50-step window, each a sync point that drains an accelerator's queue. The train step now
adds its metrics into a small device-side accumulator (`accumulate`, inside the same jitted
call), which also remembers the first step whose loss was not finite, so the divergence check
still names that step. `to_host` fetches the whole accumulator in one transfer.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fer_jax.errors import ConfigError


def zeros_like_metrics(metric_shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
  """An empty accumulator for metrics shaped like `metric_shapes` (from jax.eval_shape)."""
  return {
    'sum': {k: jnp.zeros(v.shape, jnp.float32) for k, v in metric_shapes.items()},
    'count': jnp.zeros((), jnp.int32),
    'first_bad_step': jnp.full((), -1, jnp.int32),
    'first_bad_loss': jnp.zeros((), jnp.float32),
  }


def accumulate(
  acc: dict[str, Any], metrics: dict[str, jax.Array], step: jax.Array
) -> dict[str, Any]:
  """acc + this step's metrics; `step` is the step number the metrics belong to (1-based)."""
  loss = metrics['loss'].astype(jnp.float32)
  new_bad = (acc['first_bad_step'] < 0) & ~jnp.isfinite(loss)
  return {
    'sum': {k: acc['sum'][k] + metrics[k].astype(jnp.float32) for k in acc['sum']},
    'count': acc['count'] + 1,
    'first_bad_step': jnp.where(new_bad, step.astype(jnp.int32), acc['first_bad_step']),
    'first_bad_loss': jnp.where(new_bad, loss, acc['first_bad_loss']),
  }


def to_host(acc: Any) -> dict[str, Any]:
  """The accumulator as numpy, in one device->host transfer (replicated: any one copy)."""

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.addressable_data(0)
    return x

  return jax.device_get(jax.tree.map(local, acc))


def means(host_acc: dict[str, Any]) -> dict[str, float]:
  count = max(int(host_acc['count']), 1)
  return {k: float(v) / count for k, v in host_acc['sum'].items()}


class Cadence:
  """When to evaluate and checkpoint: every `eval_every_epochs` epochs, every
  `checkpoint_every_steps` steps, and/or every `eval_every_minutes` minutes of wall time.

  The minute clock is read only at log-window boundaries, and with several processes process
  0's answer is broadcast, so every process evaluates (a collective) at the same step.
  """

  def __init__(self, train_cfg: ml_collections.ConfigDict, steps_per_epoch: int):
    self.every_epochs = int(train_cfg.get('eval_every_epochs', 1))
    self.every_steps = int(train_cfg.get('checkpoint_every_steps', 0))
    self.every_s = float(train_cfg.get('eval_every_minutes', 0.0)) * 60.0
    self.spe = steps_per_epoch
    self._last = time.time()

  def due(self, step: int, *, window_end: bool) -> bool:
    """Whether to evaluate + checkpoint after `step` (the same answer on every process)."""
    epoch_end = step % self.spe == 0
    if self.every_epochs and epoch_end and (step // self.spe) % self.every_epochs == 0:
      return True
    if self.every_steps and step % self.every_steps == 0:
      return True
    if self.every_s and window_end:
      late = time.time() - self._last >= self.every_s
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        late = bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(late))))
      return late
    return False

  def done(self) -> None:
    """An evaluation + checkpoint just happened: restart the minute clock."""
    self._last = time.time()


def steps_per_dispatch(train_cfg: ml_collections.ConfigDict, resident: bool) -> int:
  """`train.steps_per_dispatch` K checked against the feeding and the cadence.

  K > 1 runs K steps in one jitted call (a `lax.scan`), fed K blocks of indices at once, so
  it needs the training split on the devices; with data.on_device='auto' left off (CPU) it
  falls back to 1 step. The loop can log and checkpoint only between dispatches, so
  `log_every_steps` and `checkpoint_every_steps` must be multiples of K; epoch ends and the
  last step need not be (the loop runs single steps up to them: `block_length`).
  """
  k = int(train_cfg.get('steps_per_dispatch', 1))
  if k < 1:
    raise ConfigError(f'config.train.steps_per_dispatch={k}: must be at least 1')
  if k == 1:
    return 1
  if not resident:
    return 0  # the caller decides: a notice (on_device 'auto') or an error ('off')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    every = int(train_cfg.get(key, 0))
    if every % k:
      raise ConfigError(
        f'config.train.{key}={every} is not a multiple of config.train.steps_per_dispatch={k}: '
        'the loop logs and checkpoints only between dispatches'
      )
  return k


def block_length(step: int, k: int, *, periods: tuple[int, ...], stop_step: int) -> int:
  """Steps to run in the next dispatch after `step`: k when none of the next k - 1 steps ends a
  period (log window, epoch, checkpoint period; 0 = none) or is the stop step, else 1."""
  if k == 1:
    return 1
  nearest = stop_step
  for p in periods:
    if p:
      nearest = min(nearest, (step // p + 1) * p)
  return k if nearest - step >= k else 1
