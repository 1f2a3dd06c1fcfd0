"""`train.time_budget_min`: at most `train.epochs` epochs, fewer where they would not fit a
wall-clock budget on this machine.

The 2-core hosts this project runs on differ up to 2.6x in speed from one day to the next, so a
recipe sized in epochs for one host overruns its budget on another. With `time_budget_min` > 0 a
fresh run times a few train steps and one evaluation before it starts, and trains the most epochs
(up to `train.epochs`) that fit the budget, counted from the process's start, the per-epoch
evaluation and the final evaluation (its test-time augmentation included) inside it. The
number is then fixed: it is written into the checkpoints' config (a resume takes it from
there), logged, and in results.json, and `--config.train.epochs=N
--config.train.time_budget_min=0` repeats the run on any machine. Smoke runs (`max_steps`) and
one-epoch runs do not calibrate.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax.errors import ConfigError

# Images an evaluation pass runs per stored image, by test-time augmentation (evaluation.py).
TTA_VIEWS = {'none': 1, 'flip': 2, 'tencrop': 10}
# Kept free at the end of the budget: checkpoint saves, results.json.
MARGIN = 0.03
# How much slower the loop may run over the budget than in the seconds it was timed: on the
# project's shared 2-core VMs an hour's epochs ran 2-8 % slower than timed (benchmarks/README.md).
SLOWER = 0.08
# The timed steps' windows; their median is the step time (time_train_step).
WINDOWS = 5
_IMPORTED = time.time()


def process_start_time() -> float:
  """When this process started (Linux: /proc; launch.py's re-exec keeps the pid), else when
  fer_jax.time_budget was imported."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22, starttime
    with open('/proc/stat', encoding='ascii') as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith('btime '))
    started = boot + start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return _IMPORTED
  return started if started <= time.time() else _IMPORTED


def budget_s(train_cfg: ml_collections.ConfigDict) -> float:
  """The budget in seconds (0: none), checked: a number >= 0."""
  value = train_cfg.get('time_budget_min', 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
    raise ConfigError(
      f'config.train.time_budget_min={value!r}: expected minutes >= 0 (0: train.epochs, no budget)'
    )
  return float(value) * 60.0


def applies(train_cfg: ml_collections.ConfigDict, start_step: int) -> bool:
  """Whether a run times itself: a budget is set, the run is fresh (a resume keeps the epochs
  it fixed), not a smoke run (`max_steps`), and there is more than one epoch to choose from."""
  return (
    budget_s(train_cfg) > 0
    and start_step == 0
    and train_cfg.get('max_steps', -1) < 0
    and int(train_cfg.epochs) > 1
  )


def epochs_that_fit(
  *,
  budget: float,
  elapsed: float,
  step_s: float,
  steps_per_epoch: int,
  eval_s: float,
  final_eval_s: float,
  max_epochs: int,
) -> int:
  """The most whole epochs (1 to `max_epochs`) whose steps and per-epoch evaluation, after
  `elapsed` seconds and before the final evaluation, fit in `budget` less the margin, with
  the epochs and the final evaluation running `SLOWER` than timed."""
  left = budget * (1.0 - MARGIN) - elapsed - final_eval_s * (1.0 + SLOWER)
  per_epoch = (step_s * steps_per_epoch + eval_s) * (1.0 + SLOWER)
  return int(min(max_epochs, max(1, math.floor(left / per_epoch))))


def final_eval_s(eval_s: float, eval_size: int, test_size: int, tta: Iterable[str]) -> float:
  """The final evaluation's time from one single-view pass over the eval split: both splits
  single view, then each TTA mode on both."""
  views = 1 + sum(TTA_VIEWS[mode] for mode in tta)
  return eval_s * views * (eval_size + test_size) / max(eval_size, 1)


def time_train_step(
  train_fn: Callable,
  state: Any,
  batches: Iterable[Any],
  sums: Any,
  min_s: float = 3.0,
  clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, list[float], Any]:
  """(seconds per step in steady state, seconds of the first call (its compilation), the mean
  step of each of `WINDOWS` windows, the state): two warm-up steps, then about `min_s` seconds
  of steps (at least one per window, 200 at most; every process runs process 0's number, since a
  step is a collective), split into consecutive windows. The steady state is the median window:
  a stall of the shared host in one window (seen as a 30 % slower step over a whole 2-s
  timing, benchmarks/README.md) does not shorten the run by that much. `state` is donated:
  pass a copy."""
  batches = iter(batches)

  def timed(state):
    t0 = clock()
    state, out = train_fn(state, next(batches), sums)
    jax.block_until_ready(out)
    return state, clock() - t0

  state, first = timed(state)
  state, second = timed(state)
  n = agree(min(200, max(WINDOWS, math.ceil(min_s / max(second, 1e-6)))))
  took = []
  for _ in range(n):
    state, t = timed(state)
    took.append(t)
  windows = [float(np.mean(w)) for w in np.array_split(np.asarray(took), WINDOWS)]
  return float(np.median(windows)), first, windows, state


def agree(count: int) -> int:
  """Process 0's number on every process (their clocks and timings differ)."""
  if jax.process_count() == 1:
    return count
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(count))))


def with_epochs(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
  """A copy of `config` with `train.epochs` set."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.train.epochs = int(epochs)
  return out


def log_choice(
  budget: float, epochs: int, max_epochs: int, windows: Sequence[float], **figures: float
) -> None:
  """One line: the figures the choice was made from, the step's windows among them."""
  logging.info(
    'time budget %.1f min: %s (step windows %s s) -> %d epoch(s)%s',
    budget / 60,
    ', '.join(f'{k} {v:.3g} s' for k, v in figures.items()),
    '/'.join(f'{w:.3g}' for w in windows),
    epochs,
    '' if epochs < max_epochs else f' (train.epochs={max_epochs}, all fit)',
  )
