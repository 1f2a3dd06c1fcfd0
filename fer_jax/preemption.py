"""Stop at a step boundary when the job is preempted (SIGTERM), on every process at the same step.

Cloud TPU VMs (spot/preemptible), SLURM and Kubernetes send SIGTERM some seconds before they kill
a job. The train loop asks `should_stop(step)` after every step; when it answers yes, the loop
checkpoints and returns, and rerunning the same command resumes from that checkpoint.

A checkpoint is a collective save, so with several processes all of them must stop at the *same*
step, although the signal may reach only one host:

- With `jax.distributed` running, JAX's preemption sync manager catches SIGTERM (in C++) and the
  coordination service picks a step no process has reached yet;
  `multihost_utils.reached_preemption_sync_point(step)` is True on every process at that step.
  (orbax's `PreemptionCheckpointingPolicy` asks the same question.)
- Otherwise (one process, or `jax_enable_preemption_service` turned off) a one-shot Python
  SIGTERM handler sets a flag (a second SIGTERM terminates at once). With several processes the
  flags are OR-ed by an allgather every `agree_every` steps, at the same steps everywhere.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`should_stop(step)` after each step; use as a context manager around the train loop.

  Every process must call `should_stop` with the same steps in the same order, starting right
  after `start_step` (the sync protocol counts steps).
  """

  def __init__(self, start_step: int, agree_every: int = 1):
    self._agree_every = max(int(agree_every), 1)
    self._requested = threading.Event()
    self._previous_handler: Any = None
    self._handler_installed = False
    self._use_sync_point = jax.distributed.is_initialized() and _sync_point_available(start_step)
    if not self._use_sync_point:
      self._install_handler()

  def _install_handler(self) -> None:
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._handler_installed = True
    except ValueError:  # signal handlers can only be set from the main thread
      logging.warning(
        'training outside the main thread: SIGTERM will end the process without a final checkpoint'
      )

  def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
    """Asks for a stop at the next step boundary; a second SIGTERM terminates as usual."""
    del signum, frame
    self._requested.set()
    self.close()

  def should_stop(self, step: int) -> bool:
    """True when a preemption was signalled: save at this step, then stop (on all processes)."""
    if self._use_sync_point:
      stop = multihost_utils.reached_preemption_sync_point(step)
    elif jax.process_count() == 1:
      stop = self._requested.is_set()
    elif step % self._agree_every:
      stop = False
    else:
      flags = multihost_utils.process_allgather(np.int32(self._requested.is_set()))
      stop = bool(np.any(flags))
    if stop:
      logging.warning(
        'preemption requested (SIGTERM): checkpointing at step %d, then stopping', step
      )
    return stop

  def close(self) -> None:
    """Gives SIGTERM back its previous meaning (by default: terminate the process)."""
    if self._handler_installed:
      previous = self._previous_handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
      self._handler_installed = False

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _sync_point_available(step: int) -> bool:
  """Whether JAX's preemption service runs (it is on by default with jax.distributed)."""
  try:
    multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # jax_enable_preemption_service=False
    logging.warning('the JAX preemption service is off: agreeing on SIGTERM with allgathers')
    return False
  return True
