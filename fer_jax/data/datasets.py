"""One entry point from `config.data` to an in-memory Dataset, plus class weights and stats."""

from __future__ import annotations

import ml_collections
import numpy as np

from fer_jax.errors import ConfigError
from fer_jax.data.types import Dataset

SOURCES = ('csv', 'folders', 'synthetic')
CLASS_WEIGHT_FORMULAS = ('balanced', 'max_over_count', 'none')


def load_dataset(data_cfg: ml_collections.ConfigDict, *, image_size: int) -> Dataset:
  """Loads (through the on-disk cache) the dataset that `data_cfg.source` names."""
  from fer_jax.data import cache
  cache_dir = data_cfg.cache_dir or cache.default_cache_dir()
  if data_cfg.source == 'csv':
    from fer_jax.data.fer2013_csv import load_fer2013_csv
    ds = load_fer2013_csv(data_cfg.path, cache_dir=cache_dir, skip_bad_rows=data_cfg.skip_bad_rows)
  elif data_cfg.source == 'synthetic':
    from fer_jax.data.fer2013_csv import load_fer2013_csv
    from fer_jax.data.synthetic import ensure_synthetic_csv
    path = ensure_synthetic_csv(cache_dir, num_train=data_cfg.synthetic_train,
                                num_test=data_cfg.synthetic_test, seed=data_cfg.synthetic_seed)
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
    raise ConfigError(f'config.data.class_weights={formula!r}: expected one of {CLASS_WEIGHT_FORMULAS}')
  return np.where(present, w, 0.0).astype(np.float32)


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
  """Mean and std of the training pixels in [0, 1] units, for 'dataset' standardization."""
  # Chunked float64 sums: exact enough, and no float copy of the whole split.
  total, total_sq, n = 0.0, 0.0, 0
  for start in range(0, len(images), 4096):
    chunk = images[start:start + 4096].astype(np.float64) / 255.0
    total += chunk.sum()
    total_sq += np.square(chunk).sum()
    n += chunk.size
  mean = total / n
  std = max(np.sqrt(max(total_sq / n - mean * mean, 0.0)), 1e-3)
  return float(mean), float(std)
