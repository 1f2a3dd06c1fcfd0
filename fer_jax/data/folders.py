"""FER2013 as the Kaggle image-folder download: root/{train,test}/<class>/*.png|jpg|jpeg.

Class folders are matched case-insensitively and mapped to FER2013's label order
(angry 0, disgust 1, fear 2, happy 3, sad 4, surprise 5, neutral 6), not the
alphabetical order a generic folder loader would give. The layout has no separate
private test set, so test/ serves as both 'PublicTest' and 'PrivateTest'.
Decoding ~36k small PNGs takes seconds, so the decoded arrays are cached on disk.
"""

from __future__ import annotations

import os
from concurrent import futures

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from fer_jax.data import cache
from fer_jax.data.types import FER2013_CLASSES, Dataset, Split
from fer_jax.errors import DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
SPLIT_DIRS = ('train', 'test')
CACHE_KIND = 'image_folders'
# Bump when decoding changes what a tree yields, so older cache entries are rebuilt.
LOADER_VERSION = 1
_WORKERS = min(8, os.cpu_count() or 1)


def _subdirs(path: str) -> dict[str, str]:
  """Lower-cased name -> path of the directories in `path` (hidden ones ignored)."""
  out: dict[str, str] = {}
  with os.scandir(path) as it:
    for entry in sorted(it, key=lambda e: e.name):
      if entry.name.startswith('.'):
        continue
      if not entry.is_dir():
        raise DataError(f'{entry.path}: unexpected file; {path} should hold only folders')
      key = entry.name.lower()
      if key in out:
        raise DataError(f'{path} has two folders for the same name: {out[key]} and {entry.path}')
      out[key] = entry.path
  return out


def _find_split_dir(root: str, name: str) -> str:
  for entry in sorted(os.listdir(root)):
    full = os.path.join(root, entry)
    if entry.lower() == name and os.path.isdir(full):
      return full
  raise DataError(
    f'{root} has no {name}/ directory; expected the Kaggle layout '
    f'{root}/train/<class>/*.png and {root}/test/<class>/*.png'
  )


def _list_split(split_dir: str) -> tuple[list[str], np.ndarray]:
  """(image paths, labels) of one split, sorted by label then file name."""
  allowed = ', '.join(FER2013_CLASSES)
  class_dirs = _subdirs(split_dir)
  files: list[str] = []
  labels: list[int] = []
  for name, path in class_dirs.items():
    if name not in FER2013_CLASSES:
      raise DataError(
        f'{path}: unknown class folder {os.path.basename(path)!r}; '
        f'allowed names (any case): {allowed}'
      )
  for label, name in enumerate(FER2013_CLASSES):
    if name not in class_dirs:
      continue
    path = class_dirs[name]
    names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
    if not names:
      raise DataError(f'{path}: class folder is empty')
    for n in names:
      full = os.path.join(path, n)
      if os.path.isdir(full):
        raise DataError(f'{full}: unexpected folder inside a class folder')
      if not n.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f'{full}: not an image file (expected {", ".join(IMAGE_EXTENSIONS)})')
      files.append(full)
    labels.extend([label] * len(names))
  if not files:
    raise DataError(
      f'{split_dir} has no images; expected {split_dir}/<class>/*.png '
      f'with class folders among: {allowed}'
    )
  return files, np.asarray(labels, np.int32)


def _decode(path: str, image_size: int) -> np.ndarray:
  """One image as uint8 (S, S) grayscale, resized with an area-like bilinear filter."""
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img)
      img = img.convert('L')
      if img.size != (image_size, image_size):
        # Pillow widens the bilinear kernel when shrinking, so this averages like 'area'.
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(img, np.uint8)
  except Image.UnidentifiedImageError:
    raise DataError(
      f'{path}: corrupt or unreadable image (not a PNG or JPEG Pillow can identify)'
    ) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise DataError(f'{path}: corrupt or unreadable image ({reason})') from None


def _decode_all(files: list[str], image_size: int, pool: futures.Executor) -> np.ndarray:
  out = np.empty((len(files), image_size, image_size, 1), np.uint8)
  # PIL releases the GIL while decoding; map keeps file order.
  for i, img in enumerate(pool.map(lambda f: _decode(f, image_size), files, chunksize=64)):
    out[i, ..., 0] = img
  return out


def load_image_folders(root: str, *, image_size: int, cache_dir: str) -> Dataset:
  """Loads the Kaggle image folders as 'Training', 'PublicTest' and 'PrivateTest' splits.

  Images are converted to grayscale and resized (stretched) to image_size x image_size;
  'PublicTest' and 'PrivateTest' are the same arrays, both from test/.
  Raises DataError (one line naming the path) for a missing or malformed tree.
  """
  root = os.fspath(root)
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}')
  if not os.path.isdir(root):
    what = 'is not a directory' if os.path.exists(root) else 'not found'
    raise DataError(
      f'{root}: image-folder root {what} (expected {root}/train/<class>/*.png '
      f'and {root}/test/<class>/*.png)'
    )
  split_dirs = {name: _find_split_dir(root, name) for name in SPLIT_DIRS}

  def build() -> tuple[dict[str, np.ndarray], dict]:
    listed = {name: _list_split(path) for name, path in split_dirs.items()}
    arrays = {}
    with futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix='image_folders') as pool:
      for name, (files, labels) in listed.items():
        arrays[f'{name}_images'] = _decode_all(files, image_size, pool)
        arrays[f'{name}_labels'] = labels
    return arrays, {name: len(files) for name, (files, _) in listed.items()}

  arrays, meta = cache.cached_arrays(
    root,
    cache_dir=cache_dir,
    kind=CACHE_KIND,
    version=LOADER_VERSION,
    build=build,
    params={'image_size': image_size},
  )
  train = Split(images=arrays['train_images'], labels=arrays['train_labels'])
  test = Split(images=arrays['test_images'], labels=arrays['test_labels'])
  logging.info(
    'image folders %s: %d train, %d test images (test/ serves as both PublicTest and PrivateTest)',
    root,
    meta['train'],
    meta['test'],
  )
  return Dataset(
    splits={'Training': train, 'PublicTest': test, 'PrivateTest': test}, class_names=FER2013_CLASSES
  )


def is_class_folder(path: str) -> bool:
  """True when `path` holds emotion folders directly (rather than train/ and test/)."""
  names = {e.name.lower() for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')}
  return bool(names) and names <= set(FER2013_CLASSES)


def load_class_folder(path: str, *, image_size: int) -> Split:
  """One folder of emotion folders (e.g. a Kaggle root's test/) as a Split, not cached."""
  files, labels = _list_split(path)
  with futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix='image_folders') as pool:
    images = _decode_all(files, image_size, pool)
  return Split(images=images, labels=labels)
