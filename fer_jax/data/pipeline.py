"""grain input pipeline over in-memory uint8 arrays.

The loader only shuffles, batches and shards: it hands uint8 batches to the device, where
augmentation happens inside the jitted train step. Shuffling and batching work on *indices*
(grain's index shuffle is O(1) memory and reseeded per epoch), and each batch is gathered from
the arrays with one fancy-index, so the loader costs microseconds per batch.

Every process builds the same global batch of indices and keeps its own contiguous slice of it,
so the global batch (and hence training) is identical for any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from fer_jax.data.types import Split

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the remainder is dropped, reshuffled next epoch)."""
  return num_examples // global_batch


class _Gather:
  """Turns a global batch of indices into this process's uint8 batch."""

  def __init__(self, split: Split, lo: int, hi: int):
    self._images, self._labels, self._soft = split.images, split.labels, split.soft_labels
    self._lo, self._hi = lo, hi

  def __call__(self, indices: np.ndarray) -> Batch:
    idx = indices[self._lo : self._hi]
    batch = {'image': self._images[idx], 'label': self._labels[idx]}
    if self._soft is not None:
      batch['soft_label'] = self._soft[idx]
    return batch


def make_train_iterator(
  split: Split,
  *,
  global_batch: int,
  num_epochs: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """A checkpointable iterator over `num_epochs` epochs of this process's training batches.

  Each epoch is a fresh seeded permutation (grain mixes the epoch into the seed); the last
  partial global batch of an epoch is dropped. `iterator.get_state()` / `set_state()` restore
  the exact position, which the checkpoint stores.
  """
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} not divisible by {process_count} processes')
  per_process = global_batch // process_count
  n_steps = steps_per_epoch(len(split), global_batch)
  if n_steps == 0:
    raise ValueError(
      f'training split has {len(split)} examples, fewer than one batch of {global_batch}'
    )
  lo = process_index * per_process
  ds = grain.MapDataset.range(len(split)).shuffle(seed=seed)
  ds = ds[: n_steps * global_batch].batch(global_batch, batch_fn=np.stack).repeat(num_epochs)
  ds = ds.map(_Gather(split, lo, lo + per_process))
  # One prefetch thread is plenty (a batch is one fancy-index, ~1 ms); grain's default of 16
  # threads and 500 buffered elements only competes with XLA for the CPU cores.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(
  split: Split,
  *,
  global_batch: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Yields every example exactly once, in order, as this process's part of each global batch.

  The final global batch is padded (with copies of example 0) up to full size and carries
  `mask` = 0 on the padding, so metrics count each example once whatever the batch size or
  number of processes. Batches carry 'soft_label' when the split has soft labels.
  """
  per_process = global_batch // process_count
  n = len(split)
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    idx = idx[process_index * per_process : (process_index + 1) * per_process]
    mask = idx < n
    idx = np.where(mask, idx, 0)
    batch = {
      'image': split.images[idx],
      'label': split.labels[idx],
      'mask': mask.astype(np.float32),
    }
    if split.soft_labels is not None:
      batch['soft_label'] = split.soft_labels[idx]
    yield batch
