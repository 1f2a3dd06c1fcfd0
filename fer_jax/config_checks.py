"""Config validation with one-line errors, before any data is read or a device is touched."""

from __future__ import annotations

import json

import ml_collections

from fer_jax import augment, paths
from fer_jax.data import datasets, ferplus, resident
from fer_jax.errors import ConfigError
from fer_jax.evaluation import TTA_MODES
from fer_jax.models import get_model
from fer_jax.parallel import PARALLEL_MODES
from fer_jax.train_step import (
  ema_decay_rate,
  make_optimizer,
  make_plateau,
  sam_radius,
  self_distill_weight,
)

# Each list belongs to the module that uses the value; checked here before any data is read.
_CHOICES = {
  'parallel': PARALLEL_MODES,
  'data.source': datasets.SOURCES,
  'data.labels': datasets.LABELS,
  'data.ferplus_mode': ferplus.LABEL_MODES,
  'data.ferplus_classes': ferplus.NUM_CLASSES,
  'data.class_weights': datasets.CLASS_WEIGHT_FORMULAS,
}


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key and what would be valid."""
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r}: expected one of {choices}')
  positive = (
    'train.epochs',
    'train.batch_size',
    'train.eval_batch_size',
    'model.image_size',
    'train.log_every_steps',
    'train.keep_latest',
    'train.keep_best',
  )
  for key in positive:
    if _get(config, key) <= 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r}: must be positive')
  for key in (
    'train.learning_rate',
    'train.weight_decay',
    'train.l2',
    'train.warmup_epochs',
    'train.label_smoothing',
    'train.checkpoint_every_steps',
  ):
    if _get(config, key) < 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r}: must not be negative')
  for key in ('eval_every_epochs', 'eval_every_minutes'):
    if config.train.get(key, 0) < 0:
      raise ConfigError(f'config.train.{key}={config.train.get(key)!r}: must not be negative')
  if config.train.warmup_epochs > config.train.epochs:
    raise ConfigError('config.train.warmup_epochs is larger than config.train.epochs')
  for mode in config.train.get('final_tta', ()):
    if mode not in TTA_MODES:
      raise ConfigError(
        f'config.train.final_tta={tuple(config.train.final_tta)}: each must be one of {TTA_MODES}'
      )
  # The model's, the augmentation's and the optimizer's (schedule, plateau) own options are
  # checked by their owners, here before any data is read.
  get_model(config.model, 7)
  augment.check_config(config.augment)
  make_optimizer(config.train, steps_per_epoch=1000)  # any epoch length that leaves cosine steps
  make_plateau(config.train)
  ema_decay_rate(config.train)
  sam_radius(config.train)
  self_distill_weight(config.train)
  resident.setting(config.data)
  if int(config.train.get('steps_per_dispatch', 1)) < 1:
    raise ConfigError(
      f'config.train.steps_per_dispatch={config.train.steps_per_dispatch}: must be at least 1'
    )
  if config.data.source == 'tfds' and config.data.ferplus_path:
    raise ConfigError(
      "config.data.ferplus_path is not used with source='tfds': the builder reads "
      'fer2013new.csv from its manual dir (the folder of config.data.path)'
    )


def check_workdir_writable(workdir: str) -> None:
  """Fail up front, not mid-epoch, when checkpoints could not be written (local or gs://)."""
  paths.check_writable(workdir)


# Keys a resumed run may change: where the data lives, how often to log, evaluate and save,
# and how the same maths is lowered, split or driven. Any other difference would silently
# continue one run under another recipe (e.g. a cosine schedule over a new number of epochs).
RESUMABLE_CHANGES = frozenset(
  {
    'parallel',
    'data.path',
    'data.cache_dir',
    'data.tfds_data_dir',
    'data.ferplus_path',
    'data.on_device',
    'data.on_device_max_mb',
    'model.lowering',
    'train.microbatch_size',
    'train.steps_per_dispatch',
    'train.max_steps',
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.eval_every_epochs',
    'train.eval_every_minutes',
    'train.keep_latest',
    'train.keep_best',
    'train.restart_if_unreadable',
    'train.eval_batch_size',
    'train.final_tta',
    'train.allow_config_change',
    'train.time_budget_min',  # a resume keeps the epochs it fixed
  }
)
# Values that keys added after a checkpoint was written had in effect before they existed.
_LEGACY_DEFAULTS = {
  'train.ema_decay': 0.0,
  'train.sam_rho': 0.0,
  'train.self_distill': 0.0,
  'train.self_distill_flip': False,
}


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = json.loads(json.dumps(value))  # tuples -> lists, as saved
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'key=old -> new' for each recipe key whose value differs from the checkpoint's config."""
  old, new = _flat(saved), _flat(config.to_dict())
  changes = []
  for key in sorted(new):
    if key in RESUMABLE_CHANGES:
      continue
    if key in old:
      before = old[key]
    elif key in _LEGACY_DEFAULTS:
      before = _LEGACY_DEFAULTS[key]
    else:
      continue  # a key this version added, with no effect on the checkpoint's run
    if before != new[key]:
      changes.append(f'{key}={before!r} -> {new[key]!r}')
  return changes


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses to resume the checkpoint `where` under a different recipe, unless asked to."""
  changes = config_changes(saved, config)
  if changes and not config.train.get('allow_config_change', False):
    raise ConfigError(
      f'{where} was trained with another config ({"; ".join(changes)}): use a new --workdir, '
      'set those values back, or pass --config.train.allow_config_change=True to continue it'
    )
