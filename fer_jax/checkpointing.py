"""orbax checkpoints of the train state, the grain iterator position and the run metadata.

Keeps the latest N and the best M by PublicTest accuracy. The two are combined with a
preservation policy: orbax's `best_fn` together with `max_to_keep` would delete the newest
checkpoints, which breaks resuming.

Resuming tolerates damaged checkpoints (a truncated or deleted file, say from a full disk):
`restore_newest_readable` tries the steps newest first, and `set_aside` moves the unreadable
ones out of the way, since orbax silently skips saving a step that is not newer than its
latest one.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from fer_jax import paths

BEST_METRIC = 'accuracy'
UNREADABLE_DIR = 'checkpoints_unreadable'


def make_manager(
  workdir: str, *, keep_latest: int, keep_best: int, read_only: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda m: m[BEST_METRIC],
    best_mode='max',
    preservation_policy=cm.AnyPreservationPolicy(
      [
        cm.LatestN(n=keep_latest),
        cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best),
      ]
    ),
    enable_async_checkpointing=not read_only,
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    paths.resolve(workdir) / 'checkpoints',
    options=options,
    item_names=('state', 'data_iter', 'meta'),
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter: grain.DatasetIterator | None,
  meta: dict,
  metrics: dict,
) -> None:
  """Asynchronous save; `meta` is JSON (config, data statistics, class names)."""
  args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  data_iter: grain.DatasetIterator | None = None,
) -> tuple[Any, dict]:
  """Restores the state onto the shardings of `abstract_state` (and the iterator in place)."""
  args = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data_iter is not None:
    args['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored['state'], restored['meta']


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings of `tree`, as restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Restored(NamedTuple):
  """What `restore_newest_readable` found: `step` is None when no checkpoint was readable."""

  step: int | None
  state: Any
  meta: dict | None
  unreadable: dict[int, str]  # step -> why it could not be read, newest first


def _reason(e: Exception) -> str:
  first_line = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {first_line[:200]}'


def restore_newest_readable(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  data_iter: grain.DatasetIterator | None = None,
) -> Restored:
  """Restores the newest step that reads back whole, warning about each newer one that doesn't.

  When none is readable the iterator is put back where it was, so training can start fresh.
  """
  initial_iter_state = data_iter.get_state() if data_iter is not None else None
  unreadable: dict[int, str] = {}
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state, data_iter)
    except Exception as e:  # pylint: disable=broad-except
      # orbax and tensorstore raise many types for a damaged file; any of them means unreadable.
      unreadable[step] = _reason(e)
      logging.warning(
        'checkpoint step %d in %s is unreadable (%s); trying an older one',
        step,
        manager.directory,
        unreadable[step],
      )
      continue
    return Restored(step, state, meta, unreadable)
  if data_iter is not None:
    data_iter.set_state(initial_iter_state)
  return Restored(None, None, None, unreadable)


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> str:
  """Moves the step directories out of checkpoints/ (kept for inspection); returns where to."""
  directory = epath.Path(manager.directory)
  dest = directory.parent / UNREADABLE_DIR / time.strftime('%Y%m%d-%H%M%S')
  if jax.process_index() == 0:
    dest.mkdir(parents=True, exist_ok=True)
    for step in steps:
      path = directory / str(step)
      if path.exists():
        path.rename(dest / str(step))  # an object store copies and deletes
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes('fer_jax_set_aside_unreadable')
  manager.reload()
  return os.fspath(dest)
