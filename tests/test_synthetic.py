"""The synthetic FER2013-layout generator: determinism, CSV validity, class structure."""

import os

import numpy as np
import pytest

from fer_jax import errors
from fer_jax.data import synthetic
from fer_jax.data.fer2013_csv import parse_fer2013_csv
from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES

NUM_TRAIN, NUM_TEST = 70, 21


@pytest.fixture(scope='module')
def csv_path(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('synthetic') / 'faces.csv')
  synthetic.write_synthetic_csv(path, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)
  return path


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def test_same_seed_same_bytes_other_seed_differs(csv_path, tmp_path):
  again, other = str(tmp_path / 'again.csv'), str(tmp_path / 'other.csv')
  synthetic.write_synthetic_csv(again, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)
  synthetic.write_synthetic_csv(other, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=4)
  assert _read(again) == _read(csv_path)
  assert _read(other) != _read(csv_path)
  # Only the finished file is left behind (written to a temporary file, then renamed).
  assert sorted(os.listdir(tmp_path)) == ['again.csv', 'other.csv']


def test_csv_is_valid_fer2013_and_matches_the_rendered_arrays(csv_path):
  with open(csv_path) as f:
    assert f.readline() == 'emotion,pixels,Usage\n'
    first = f.readline().rstrip('\n').split(',')
  assert len(first) == 3 and len(first[1].split(' ')) == 48 * 48
  parsed = parse_fer2013_csv(csv_path)
  assert parsed.skipped == {} and parsed.rows_read == NUM_TRAIN + 2 * NUM_TEST
  splits = synthetic.synthetic_splits(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)
  for i, usage in enumerate(FER2013_USAGES):
    images, labels = splits[usage]
    mask = parsed.usage == i
    np.testing.assert_array_equal(parsed.images[mask], images)
    np.testing.assert_array_equal(parsed.labels[mask], labels)


def test_split_sizes_classes_and_pixel_range():
  splits = synthetic.synthetic_splits(num_train=600, num_test=7, seed=0)
  assert list(splits) == list(FER2013_USAGES)
  for usage, (images, labels) in splits.items():
    assert images.dtype == np.uint8 and images.shape[1:] == (48, 48)
    assert labels.dtype == np.int32
    assert len(images) == len(labels) == (600 if usage == 'Training' else 7)
    assert set(labels.tolist()) == set(range(len(FER2013_CLASSES)))
    # Real contrast, not a flat or saturated image.
    spread = images.reshape(len(images), -1).std(axis=1)
    assert spread.min() > 10
  counts = np.bincount(splits['Training'][1], minlength=7)
  assert counts.argmin() == 1  # disgust is the rarest, as in FER2013
  assert counts.argmax() == 3  # happy the commonest


def test_test_splits_do_not_depend_on_num_train():
  a = synthetic.synthetic_splits(num_train=7, num_test=14, seed=0)
  b = synthetic.synthetic_splits(num_train=30, num_test=14, seed=0)
  np.testing.assert_array_equal(a['PublicTest'][0], b['PublicTest'][0])
  assert not np.array_equal(a['PublicTest'][0], a['PrivateTest'][0])


def test_too_few_rows_for_all_classes_is_a_config_error():
  with pytest.raises(errors.ConfigError, match='at least 7 rows'):
    synthetic.synthetic_splits(num_train=6, num_test=10)


def test_render_faces_validates_labels():
  out = synthetic.render_faces(np.array([0, 6, 3]), np.random.default_rng(0))
  assert out.shape == (3, 48, 48) and out.dtype == np.uint8
  with pytest.raises(ValueError, match='labels'):
    synthetic.render_faces(np.array([7]), np.random.default_rng(0))


def _standardized_faces(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  labels = np.repeat(np.arange(7), per_class)
  x = synthetic.render_faces(labels, np.random.default_rng(seed)).reshape(len(labels), -1)
  x = x.astype(np.float64)
  return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True), labels


def test_expressions_are_learnable_but_not_linearly_trivial():
  # Kernel ridge regression on pixels (linear kernel) from one sample to another: the
  # expressions must be well above chance (1/7) but far from solved, since pose,
  # lighting and expression intensity vary; a CNN is expected to do much better.
  x_fit, y_fit = _standardized_faces(200, seed=0)
  x_val, y_val = _standardized_faces(60, seed=1)
  alpha = np.linalg.solve(x_fit @ x_fit.T + 1000.0 * np.eye(len(x_fit)), np.eye(7)[y_fit])
  accuracy = ((x_val @ x_fit.T @ alpha).argmax(1) == y_val).mean()
  assert 0.3 < accuracy < 0.8, accuracy


def test_surprise_opens_the_mouth():
  # Mean images per class (each image standardized): surprise's round open mouth darkens
  # the mouth centre relative to neutral's thin closed line, far beyond sampling noise.
  per_class = 150
  labels = np.repeat([5, 6], per_class)
  images = synthetic.render_faces(labels, np.random.default_rng(0)).astype(np.float64)
  images = (images - images.mean((1, 2), keepdims=True)) / images.std((1, 2), keepdims=True)
  surprise, neutral = images.reshape(2, per_class, 48, 48).mean(1)
  mouth_centre = (slice(33, 41), slice(21, 27))
  assert surprise[mouth_centre].mean() < neutral[mouth_centre].mean() - 0.3
  halves = images[labels == 6].reshape(2, per_class // 2, 48, 48).mean(1)
  noise = np.abs(halves[0][mouth_centre] - halves[1][mouth_centre]).mean()
  assert np.abs(surprise[mouth_centre] - neutral[mouth_centre]).mean() > 3 * noise


def test_ensure_synthetic_csv_generates_once(tmp_path, monkeypatch):
  cache_dir = str(tmp_path / 'cache')
  path = synthetic.ensure_synthetic_csv(cache_dir, num_train=14, num_test=7, seed=1)
  assert os.path.dirname(path) == cache_dir
  assert f'v{synthetic.GENERATOR_VERSION}' in os.path.basename(path)
  content = _read(path)

  def fail(*args, **kwargs):
    raise AssertionError('regenerated a cached CSV')

  monkeypatch.setattr(synthetic, 'write_synthetic_csv', fail)
  assert synthetic.ensure_synthetic_csv(cache_dir, num_train=14, num_test=7, seed=1) == path
  assert _read(path) == content
  with pytest.raises(AssertionError, match='regenerated'):
    synthetic.ensure_synthetic_csv(cache_dir, num_train=14, num_test=7, seed=2)
