"""The numpy per-epoch permutation feeding training: order, exact seek, process slices, speed."""

import time

import numpy as np
import pytest

from fer_jax.data.epoch_order import EpochBatches
from fer_jax.data.types import Split


def make_split(n: int) -> Split:
  images = np.zeros((n, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 1, 0] = np.arange(n) // 256
  return Split(images=images, labels=(np.arange(n) % 7).astype(np.int32))


def ids(batch) -> np.ndarray:
  return batch['image'][:, 0, 0, 0].astype(int) + 256 * batch['image'][:, 0, 1, 0].astype(int)


def test_each_epoch_is_a_fresh_permutation_without_its_remainder():
  it = EpochBatches(make_split(103), global_batch=10, seed=3)
  epochs = [np.concatenate([ids(next(it)) for _ in range(10)]) for _ in range(2)]
  for e, order in enumerate(epochs):
    assert len(set(order)) == 100  # 10 full batches, 3 examples dropped
    np.testing.assert_array_equal(order, it.epoch_order(e)[:100])
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(
    epochs[0], EpochBatches(make_split(103), global_batch=10, seed=4).epoch_order(0)[:100]
  )
  it.close()


def test_seek_resumes_exactly_and_process_slices_tile_the_global_batch():
  straight = EpochBatches(make_split(96), global_batch=12, seed=1)
  expected = [ids(next(straight)) for _ in range(20)]  # crosses two epoch boundaries
  resumed = EpochBatches(make_split(96), global_batch=12, seed=1, start_step=0)
  resumed.seek(13)
  assert [list(ids(next(resumed))) for _ in range(7)] == [list(b) for b in expected[13:]]
  parts = [
    EpochBatches(
      make_split(96),
      global_batch=12,
      seed=1,
      process_index=p,
      process_count=3,
      start_step=13,
      prefetch=False,
    )
    for p in range(3)
  ]
  for step in range(13, 20):
    np.testing.assert_array_equal(np.concatenate([ids(next(p)) for p in parts]), expected[step])
  with pytest.raises(ValueError, match='not divisible by 5 processes'):
    EpochBatches(make_split(96), global_batch=12, seed=1, process_count=5)


def test_a_large_global_batch_costs_microseconds_per_example():
  split = Split(images=np.zeros((20000, 48, 48, 1), np.uint8), labels=np.zeros(20000, np.int32))
  it = EpochBatches(split, global_batch=4096, seed=0, prefetch=False)
  next(it)
  t = time.perf_counter()
  for _ in range(8):
    next(it)
  per_example = (time.perf_counter() - t) / (8 * 4096)
  assert per_example < 5e-6, per_example  # grain's index shuffle: ~40 us/example here
