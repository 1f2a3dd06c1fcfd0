"""`load(workdir, checkpoint)`: a trained checkpoint as a `TrainedModel`, for the evaluation,
report and prediction tools.

A checkpoint carries everything needed to rebuild the model and its input pipeline: the config,
the class names and the training pixel statistics (its 'meta' item). Only the parameters of the
train state are read: the abstract target holds `params` alone and orbax restores that subtree,
so neither the optimizer nor the data iterator has to be rebuilt, and the weights land directly
on the requested sharding (replicated over a mesh, or on one device).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from fer_jax import checkpointing, logs, paths
from fer_jax.errors import FerJaxError
from fer_jax.models import get_model

CHECKPOINT_CHOICES = "'best', 'latest' or a step number"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A restored checkpoint: the model, its parameters and how its inputs were prepared."""

  workdir: str
  checkpoint: str  # as asked for: 'best', 'latest' or the step as a string
  step: int
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  pixel_mean: float
  pixel_std: float
  model: nn.Module
  variables: Any  # what model.apply takes: {'params': ..., 'batch_stats': ...}

  @property
  def params(self) -> Any:
    return self.variables['params']

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_size(self) -> int:
    """The model's input side length (the device resizes to it)."""
    return int(self.config.model.image_size)

  @property
  def data_size(self) -> int:
    """The side length of the stored training images: 48 for FER2013 CSV and synthetic data.

    Faces cropped from photos are resized to this on the host, so they reach the model through
    the same device-side resize (48 -> image_size) as the training images did.
    """
    return self.image_size if self.config.data.source == 'folders' else 48


def resolve_step(manager: ocp.CheckpointManager, checkpoint: str | int) -> int:
  """'best' (by PublicTest accuracy), 'latest', or an existing step number -> the step."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise FerJaxError(f'{manager.directory}: no checkpoints (has this workdir been trained?)')
  spec = str(checkpoint).strip()
  if spec == 'latest':
    return int(manager.latest_step())
  if spec == 'best':
    best = manager.best_step()
    return int(best if best is not None else manager.latest_step())
  try:
    step = int(spec)
  except ValueError:
    raise FerJaxError(f'checkpoint={spec!r}: expected {CHECKPOINT_CHOICES}') from None
  if step not in steps:
    raise FerJaxError(
      f'{manager.directory}: no checkpoint at step {step}; kept steps: {", ".join(map(str, steps))}'
    )
  return step


def default_sharding() -> jax.sharding.Sharding:
  """Replicated over all devices on the training mesh's 'data' axis."""
  from fer_jax import parallel

  return parallel.replicated(parallel.make_mesh())


def load(
  workdir: str, checkpoint: str | int = 'best', *, sharding: jax.sharding.Sharding | None = None
) -> TrainedModel:
  """Restores the parameters and metadata of one checkpoint of `workdir`.

  The variables are those training evaluated: the moving average when `train.ema_decay` > 0.

  Args:
    workdir: a directory written by `train_and_evaluate` (it holds checkpoints/).
    checkpoint: 'best' (highest PublicTest accuracy), 'latest' or a step number.
    sharding: where the parameters go; replicated over every device when None.

  Raises:
    FerJaxError: a missing workdir, no checkpoints, or an unknown step, as one line.
  """
  root = paths.resolve(workdir)  # local or an object store (gs://)
  workdir = os.fspath(root)
  if not (root / 'checkpoints').is_dir():
    what = 'has no checkpoints/ directory' if root.is_dir() else 'not found'
    raise FerJaxError(f'workdir {workdir}: {what}')
  with logs.quiet_read_only_notices():
    manager = checkpointing.make_manager(workdir, keep_latest=1, keep_best=1, read_only=True)
  try:
    step = resolve_step(manager, checkpoint)
    meta = checkpointing.restore_meta(manager, step)
    config = ml_collections.ConfigDict(meta['config'])
    class_names = tuple(meta['class_names'])
    model = get_model(config.model, len(class_names))
    size = int(config.model.image_size)
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1), jnp.float32), train=False)
    )
    sharding = sharding or default_sharding()
    # The train state keeps 'params' at its top and the other collections (BatchNorm's
    # 'batch_stats') under 'model_state'; a SeedCNN checkpoint from before model_state existed
    # has params only, which is all SeedCNN needs.
    abstract = lambda tree: jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
    )
    target = {'params': abstract(shapes['params'])}
    others = {k: v for k, v in shapes.items() if k != 'params'}
    if others:
      target['model_state'] = abstract(others)
    # A run with train.ema_decay > 0 evaluated and selected its moving average: load that.
    use_ema = float(config.get('train', {}).get('ema_decay', 0.0)) > 0
    if use_ema:
      target = {'ema': abstract(dict(shapes))}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
      )
    except (KeyError, ValueError) as e:
      raise FerJaxError(
        f'{manager.directory} step {step}: the checkpoint does not match model '
        f'{config.model.name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})'
      ) from None
  finally:
    manager.close()
  state = restored['state']
  variables = (
    dict(state['ema']) if use_ema else {'params': state['params'], **state.get('model_state', {})}
  )
  return TrainedModel(
    workdir=workdir,
    checkpoint=str(checkpoint),
    step=step,
    config=config,
    class_names=class_names,
    pixel_mean=float(meta['pixel_mean']),
    pixel_std=float(meta['pixel_std']),
    model=model,
    variables=variables,
  )
