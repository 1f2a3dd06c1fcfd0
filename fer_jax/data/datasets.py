"""One entry point from `config.data` to an in-memory Dataset, plus class weights and stats."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES, Dataset, Split
from fer_jax.errors import ConfigError, DataError

SOURCES = ('csv', 'folders', 'synthetic', 'tfds')
LABELS = ('fer2013', 'ferplus')
CLASS_WEIGHT_FORMULAS = ('balanced', 'max_over_count', 'none')


def ferplus_path(data_cfg: ml_collections.ConfigDict) -> str:
  """config.data.ferplus_path, or fer2013new.csv in the folder of config.data.path."""
  from fer_jax.data.ferplus import FILE_NAME

  if data_cfg.get('ferplus_path'):
    return os.path.expanduser(data_cfg.ferplus_path)
  return os.path.join(
    os.path.dirname(os.path.abspath(os.path.expanduser(data_cfg.path))), FILE_NAME
  )


def load_dataset(data_cfg: ml_collections.ConfigDict, *, image_size: int) -> Dataset:
  """Loads (through the on-disk cache) the dataset that `data_cfg.source` names.

  With `data_cfg.labels == 'ferplus'` the csv and tfds sources carry FER+ labels instead.
  """
  from fer_jax.data import cache

  cache_dir = data_cfg.cache_dir or cache.default_cache_dir()
  # Configs saved before FER+ existed lack the FER+ keys: they mean FER2013 labels.
  labels = data_cfg.get('labels', 'fer2013')
  if labels not in LABELS:
    raise ConfigError(f'config.data.labels={labels!r}: expected one of {LABELS}')
  if labels == 'ferplus' and data_cfg.source not in ('csv', 'tfds'):
    raise ConfigError(
      f"config.data.labels='ferplus' needs config.data.source 'csv' or 'tfds', "
      f'not {data_cfg.source!r}'
    )
  ferplus_args = dict(
    mode=data_cfg.get('ferplus_mode', 'majority'),
    num_classes=data_cfg.get('ferplus_classes', 8),
    train_split=data_cfg.train_split,
  )
  if data_cfg.source == 'csv' and labels == 'ferplus':
    from fer_jax.data import ferplus

    votes_path = ferplus_path(data_cfg)
    if os.path.exists(data_cfg.path) and not os.path.isfile(votes_path):
      raise ConfigError(
        f"config.data.labels='ferplus': {votes_path} not found. "
        f'{ferplus.WHERE_FROM}; put it there or pass '
        '--config.data.ferplus_path=...'
      )
    ds = ferplus.load_ferplus_csv(
      data_cfg.path,
      votes_path,
      cache_dir=cache_dir,
      skip_bad_rows=data_cfg.skip_bad_rows,
      **ferplus_args,
    )
  elif data_cfg.source == 'csv':
    from fer_jax.data.fer2013_csv import load_fer2013_csv

    ds = load_fer2013_csv(data_cfg.path, cache_dir=cache_dir, skip_bad_rows=data_cfg.skip_bad_rows)
  elif data_cfg.source == 'tfds':
    ds = _load_tfds(data_cfg, cache_dir, labels, ferplus_args)
  elif data_cfg.source == 'synthetic':
    from fer_jax.data.fer2013_csv import load_fer2013_csv
    from fer_jax.data.synthetic import ensure_synthetic_csv

    path = ensure_synthetic_csv(
      cache_dir,
      num_train=data_cfg.synthetic_train,
      num_test=data_cfg.synthetic_test,
      seed=data_cfg.synthetic_seed,
    )
    ds = load_fer2013_csv(path, cache_dir=cache_dir, skip_bad_rows=False)
  elif data_cfg.source == 'folders':
    from fer_jax.data.folders import load_image_folders

    ds = load_image_folders(data_cfg.path, image_size=image_size, cache_dir=cache_dir)
  else:
    raise ConfigError(f'config.data.source={data_cfg.source!r}: expected one of {SOURCES}')
  for name in (data_cfg.train_split, data_cfg.eval_split, data_cfg.test_split):
    if name not in ds.splits:
      raise ConfigError(f'split {name!r} not in the dataset (it has {sorted(ds.splits)})')
  return ds


def load_dataset_or_path(
  data_cfg: ml_collections.ConfigDict, *, image_size: int, data_size: int, data_path: str = ''
) -> tuple[Dataset, str]:
  """(Dataset, description) of the configured data, or of `data_path` when given.

  `data_path` may be a FER2013 CSV (.csv or .csv.gz), a Kaggle image-folder root
  (train/ and test/ holding one folder per emotion), or a single folder of emotion folders
  (e.g. that root's test/), which becomes the only split, named after the folder; its faces
  are resized to `data_size` (the stored side of the training images).
  """
  from fer_jax.data import folders

  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  if data_path:
    data_path = os.path.abspath(data_path)
    if os.path.isdir(data_path):
      if folders.is_class_folder(data_path):
        name = os.path.basename(data_path.rstrip(os.sep))
        split = folders.load_class_folder(data_path, image_size=data_size)
        return Dataset(splits={name: split}), f'image folder {data_path}'
      data_cfg.source = 'folders'
    elif os.path.isfile(data_path):
      data_cfg.source = 'csv'
    else:
      raise DataError(f'{data_path}: not found')
    data_cfg.path = data_path
  elif data_cfg.source != 'synthetic' and not os.path.exists(data_cfg.path):
    raise DataError(
      f'{data_cfg.path}: the configured dataset is not found (from {os.getcwd()}); '
      'point to it with --data_path'
    )
  dataset = load_dataset(data_cfg, image_size=image_size)
  what = {'csv': 'FER2013 CSV', 'folders': 'image folders', 'synthetic': 'synthetic faces'}
  where = f' {data_cfg.path}' if data_cfg.source != 'synthetic' else ''
  return dataset, f'{what.get(data_cfg.source, data_cfg.source)}{where}'


def _load_tfds(
  data_cfg: ml_collections.ConfigDict, cache_dir: str, labels: str, ferplus_args: dict
) -> Dataset:
  """The TFDS `fer2013` dataset (built on first use from the manual dir) as a Dataset."""
  try:
    from fer_jax.data import tfds_fer2013
  except ImportError as e:
    raise ConfigError(
      f"config.data.source='tfds' needs tensorflow-datasets: pip install 'fer_jax[tfds]' ({e})"
    ) from None
  data_dir = data_cfg.get('tfds_data_dir') or tfds_fer2013.default_data_dir(cache_dir)
  splits = tfds_fer2013.read_fer2013(
    data_dir=data_dir,
    manual_dir=tfds_fer2013.manual_dir_of(data_cfg.path),
    with_votes=labels == 'ferplus',
  )
  if labels == 'ferplus':
    from fer_jax.data import ferplus

    names = list(splits)
    return ferplus.ferplus_dataset(
      np.concatenate([splits[n]['image'] for n in names]),
      np.concatenate(
        [np.full(len(splits[n]['label']), FER2013_USAGES.index(n), np.int8) for n in names]
      ),
      np.concatenate([splits[n]['ferplus_votes'] for n in names]),
      **ferplus_args,
    )
  return Dataset(
    splits={n: Split(images=s['image'], labels=s['label']) for n, s in splits.items()},
    class_names=FER2013_CLASSES,
  )


def class_weights(labels: np.ndarray, num_classes: int, formula: str) -> np.ndarray:
  """Per-class loss weights from the training labels (Keras `class_weight` semantics).

  'balanced' = n / (k * count) (sklearn's), 'max_over_count' = max(count) / count (the seed
  notebook's; about 16 for Disgust on FER2013), 'none' = all ones. Under the two formulas a
  class absent from the training labels gets weight 0 (it contributes no loss anyway).
  """
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  present = counts > 0
  safe = np.where(present, counts, 1.0)
  if formula == 'balanced':
    w = len(labels) / (num_classes * safe)
  elif formula == 'max_over_count':
    w = counts.max() / safe
  elif formula == 'none':
    return np.ones(num_classes, np.float32)
  else:
    raise ConfigError(
      f'config.data.class_weights={formula!r}: expected one of {CLASS_WEIGHT_FORMULAS}'
    )
  return np.where(present, w, 0.0).astype(np.float32)


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
  """Mean and std of the training pixels in [0, 1] units, for 'dataset' standardization."""
  # Chunked float64 sums: exact enough, and no float copy of the whole split.
  total, total_sq, n = 0.0, 0.0, 0
  for start in range(0, len(images), 4096):
    chunk = images[start : start + 4096].astype(np.float64) / 255.0
    total += chunk.sum()
    total_sq += np.square(chunk).sum()
    n += chunk.size
  mean = total / n
  std = max(np.sqrt(max(total_sq / n - mean * mean, 0.0)), 1e-3)
  return float(mean), float(std)
