"""orbax checkpoints of the train state, the grain iterator position and the run metadata.

Keeps the latest N and the best M by PublicTest accuracy. The two are combined with a
preservation policy: orbax's `best_fn` together with `max_to_keep` would delete the newest
checkpoints, which breaks resuming.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

BEST_METRIC = 'accuracy'


def make_manager(workdir: str, *, keep_latest: int, keep_best: int,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda m: m[BEST_METRIC],
      best_mode='max',
      preservation_policy=cm.AnyPreservationPolicy([
          cm.LatestN(n=keep_latest),
          cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=keep_best),
      ]),
      enable_async_checkpointing=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options,
                               item_names=('state', 'data_iter', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter: grain.DatasetIterator | None, meta: dict, metrics: dict) -> None:
  """Asynchronous save; `meta` is JSON (config, data statistics, class names)."""
  args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: grain.DatasetIterator | None = None) -> tuple[Any, dict]:
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
