"""The grain loader: per-epoch shuffles, exact resume, process sharding, exact evaluation."""

import numpy as np
import pytest

from fer_jax.data import pipeline
from fer_jax.data.datasets import class_weights, pixel_stats
from fer_jax.data.types import Split


def _split(n=50, size=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)  # the example's id, readable from the batch
  return Split(images, (np.arange(n) % 7).astype(np.int32))


def _ids(batch):
  return batch['image'][:, 0, 0, 0].astype(int)


def test_epochs_are_permutations_that_differ():
  split = _split()
  it = pipeline.make_train_iterator(split, global_batch=10, num_epochs=2, seed=1)
  batches = [_ids(next(it)) for _ in range(10)]
  e0, e1 = np.concatenate(batches[:5]), np.concatenate(batches[5:])
  assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
  assert not np.array_equal(e0, e1)
  with pytest.raises(StopIteration):
    next(it)


def test_labels_follow_images():
  split = _split()
  batch = next(pipeline.make_train_iterator(split, global_batch=8, num_epochs=1, seed=0))
  np.testing.assert_array_equal(batch['label'], _ids(batch) % 7)
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, 4, 4, 1)


def test_seed_changes_order_and_same_seed_repeats():
  split = _split()
  first = lambda seed: _ids(
    next(pipeline.make_train_iterator(split, global_batch=10, num_epochs=1, seed=seed))
  )
  np.testing.assert_array_equal(first(3), first(3))
  assert not np.array_equal(first(3), first(4))


def test_resume_from_state_is_exact():
  split = _split()
  it = pipeline.make_train_iterator(split, global_batch=8, num_epochs=3, seed=5)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [_ids(next(it)) for _ in range(8)]
  resumed = pipeline.make_train_iterator(split, global_batch=8, num_epochs=3, seed=5)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(_ids(next(resumed)), want)


def test_processes_split_the_same_global_batch():
  split = _split()
  whole = pipeline.make_train_iterator(split, global_batch=12, num_epochs=1, seed=2)
  parts = [
    pipeline.make_train_iterator(
      split, global_batch=12, num_epochs=1, seed=2, process_index=p, process_count=3
    )
    for p in range(3)
  ]
  for _ in range(4):
    glued = np.concatenate([_ids(next(p)) for p in parts])
    np.testing.assert_array_equal(glued, _ids(next(whole)))


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_count_every_example_once(process_count):
  split = _split(n=23)
  seen = []
  for p in range(process_count):
    for batch in pipeline.eval_batches(
      split, global_batch=8, process_index=p, process_count=process_count
    ):
      assert len(batch['label']) == 8 // process_count
      seen.extend(_ids(batch)[batch['mask'] > 0])
  assert sorted(seen) == list(range(23))


def test_class_weight_formulas():
  labels = np.array([0, 0, 0, 1, 2, 2], np.int32)
  np.testing.assert_allclose(class_weights(labels, 4, 'balanced'), [6 / 12, 6 / 4, 6 / 8, 0])
  np.testing.assert_allclose(class_weights(labels, 4, 'max_over_count'), [1, 3, 1.5, 0])
  np.testing.assert_allclose(class_weights(labels, 4, 'none'), [1, 1, 1, 1])


def test_pixel_stats_match_numpy():
  images = np.random.default_rng(1).integers(0, 256, (9000, 3, 3, 1), dtype=np.uint8)
  mean, std = pixel_stats(images)
  assert mean == pytest.approx(images.mean() / 255, rel=1e-9)
  assert std == pytest.approx((images / 255).std(), rel=1e-6)
