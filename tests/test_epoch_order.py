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


def _indices(process_count: int, start: int, steps: int, *, block: int = 1) -> list[np.ndarray]:
  """The global batches of steps [start, start + steps) as `process_count` processes feed them
  (each its slice; blocks of `block` steps via next_block), concatenated in process order."""
  parts = [
    EpochBatches(
      make_split(100),
      global_batch=12,
      seed=2,
      process_index=p,
      process_count=process_count,
      start_step=start,
      indices_only=True,
    )
    for p in range(process_count)
  ]
  out = []
  for _ in range(steps // block):
    feeds = [p.next_block(block)['index'] if block > 1 else next(p)['index'] for p in parts]
    assert all(f.dtype == np.int32 and f.flags.c_contiguous for f in feeds)
    assert all(f.shape[-1] == 12 // process_count for f in feeds)
    out.extend(np.concatenate(feeds, axis=-1).reshape(block, 12))
  return out


def test_a_checkpoint_resumes_with_any_process_count():
  # The saved position is the step alone: 2 processes stop at step 7, 4 (or 1, or 3 in blocks of
  # 3 steps, crossing epoch ends: 8 steps an epoch) go on, and feed what one process would have.
  straight = _indices(1, 0, 19)
  np.testing.assert_array_equal(_indices(2, 0, 7), straight[:7])
  for count, block in ((4, 1), (1, 1), (3, 3), (6, 2)):
    np.testing.assert_array_equal(_indices(count, 7, 12, block=block), straight[7:19])
