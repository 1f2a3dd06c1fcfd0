"""In-memory dataset containers shared by every data source."""

from __future__ import annotations

import dataclasses

import numpy as np

# FER2013's label order (the CSV's `emotion` column).
FER2013_CLASSES: tuple[str, ...] = (
    'angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
FER2013_USAGES: tuple[str, ...] = ('Training', 'PublicTest', 'PrivateTest')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: uint8 images (N, H, W, 1) and int32 labels (N,)."""
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}')
    if len(self.images) != len(self.labels):
      raise ValueError('images and labels differ in length')

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Named splits plus the class names in label order."""
  splits: dict[str, Split]
  class_names: tuple[str, ...] = FER2013_CLASSES

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __getitem__(self, name: str) -> Split:
    return self.splits[name]
