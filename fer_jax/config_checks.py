"""Config validation with one-line errors, before any data is read or a device is touched."""

from __future__ import annotations

import os
import tempfile

import ml_collections

from fer_jax.errors import ConfigError, FerJaxError

_CHOICES = {
    'parallel': ('jit', 'pmap'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.lowering': ('auto', 'xla', 'dot', 'native'),
    'train.schedule': ('constant', 'cosine'),
    'data.source': ('csv', 'folders', 'synthetic', 'tfds'),
    'data.labels': ('fer2013', 'ferplus'),
    'data.ferplus_mode': ('majority', 'probability'),
    'data.ferplus_classes': (8, 7),
    'data.class_weights': ('balanced', 'max_over_count', 'none'),
    'augment.standardize': ('dataset', 'per_image', 'none'),
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
  positive = ('train.epochs', 'train.batch_size', 'train.eval_batch_size', 'model.image_size',
              'train.log_every_steps', 'train.keep_latest', 'train.keep_best')
  for key in positive:
    if _get(config, key) <= 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r}: must be positive')
  for key in ('train.learning_rate', 'train.weight_decay', 'train.l2', 'train.warmup_epochs',
              'train.label_smoothing', 'train.checkpoint_every_steps'):
    if _get(config, key) < 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r}: must not be negative')
  if config.train.warmup_epochs > config.train.epochs:
    raise ConfigError('config.train.warmup_epochs is larger than config.train.epochs')
  if len(config.model.dropout) != 3 or not all(0 <= r < 1 for r in config.model.dropout):
    raise ConfigError(f'config.model.dropout={tuple(config.model.dropout)}: expected 3 rates in [0, 1)')
  if config.model.image_size < 12:
    raise ConfigError(f'config.model.image_size={config.model.image_size}: SeedCNN needs at least 12')
  if config.data.source == 'tfds' and config.data.ferplus_path:
    raise ConfigError("config.data.ferplus_path is not used with source='tfds': the builder reads "
                      'fer2013new.csv from its manual dir (the folder of config.data.path)')


def check_workdir_writable(workdir: str) -> None:
  """Fail up front, not mid-epoch, when checkpoints could not be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test_'):
      pass
  except OSError as e:
    raise FerJaxError(f'workdir {workdir} is not writable: {e.strerror or e}') from None
