"""In-memory dataset containers shared by every data source."""

from __future__ import annotations

import dataclasses

import numpy as np

# FER2013's label order (the CSV's `emotion` column).
FER2013_CLASSES: tuple[str, ...] = (
  'angry',
  'disgust',
  'fear',
  'happy',
  'sad',
  'surprise',
  'neutral',
)
FER2013_USAGES: tuple[str, ...] = ('Training', 'PublicTest', 'PrivateTest')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: uint8 images (N, H, W, 1) and int32 labels (N,).

  `soft_labels` (N, K) float32, rows summing to 1, are optional training targets (FER+
  vote distributions); `labels` then holds their argmax, for class weights and accuracy.
  """

  images: np.ndarray
  labels: np.ndarray
  soft_labels: np.ndarray | None = None

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(
        f'images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}'
      )
    if len(self.images) != len(self.labels):
      raise ValueError('images and labels differ in length')
    soft = self.soft_labels
    if soft is not None and (soft.dtype != np.float32 or soft.ndim != 2 or len(soft) != len(self)):
      raise ValueError(
        f'soft_labels must be float32 (N, K) with N={len(self)}, got {soft.dtype} {soft.shape}'
      )

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Named splits plus the class names in label order."""

  splits: dict[str, Split]
  class_names: tuple[str, ...] = FER2013_CLASSES

  def __post_init__(self):
    for name, split in self.splits.items():
      if split.soft_labels is not None and split.soft_labels.shape[1] != self.num_classes:
        raise ValueError(
          f'split {name!r} has {split.soft_labels.shape[1]} soft-label columns '
          f'for {self.num_classes} classes'
        )

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __getitem__(self, name: str) -> Split:
    return self.splits[name]
