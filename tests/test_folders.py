"""The Kaggle image-folder loader: label order, grayscale, resize, splits, cache, errors."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from fer_jax.data import folders
from fer_jax.errors import DataError


def _save_gray(path: pathlib.Path, value: int, size=(48, 48)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size[::-1], value, np.uint8), mode='L').save(path)


def _make_tree(root: pathlib.Path) -> None:
  """train: angry (2 files), HAPPY (colour jpg), Neutral (100x80), sad; test: disgust, surprise."""
  _save_gray(root / 'train' / 'angry' / 'b.png', 20)
  _save_gray(root / 'train' / 'angry' / 'a.png', 10)
  (root / 'train' / 'HAPPY').mkdir(parents=True)
  Image.new('RGB', (48, 48), (200, 100, 50)).save(root / 'train' / 'HAPPY' / 'x.jpg', quality=95)
  # 100 wide, 80 high: dark left half, bright right half.
  wide = np.zeros((80, 100), np.uint8)
  wide[:, 50:] = 250
  (root / 'train' / 'Neutral').mkdir(parents=True)
  Image.fromarray(wide, mode='L').save(root / 'train' / 'Neutral' / 'w.png')
  _save_gray(root / 'train' / 'sad' / 's.jpeg', 90)
  _save_gray(root / 'test' / 'surprise' / 'q.png', 150)
  _save_gray(root / 'test' / 'disgust' / 'p.png', 60)


@pytest.fixture
def tree(tmp_path) -> pathlib.Path:
  root = tmp_path / 'fer_folders'
  _make_tree(root)
  return root


def _load(root, image_size=48, cache_dir=None):
  return folders.load_image_folders(
    str(root), image_size=image_size, cache_dir=str(cache_dir or root.parent / 'cache')
  )


def test_labels_follow_fer2013_order_and_files_are_sorted(tree):
  ds = _load(tree)
  train = ds['Training']
  # angry 0 (a.png then b.png), happy 3, sad 4, neutral 6: FER2013 order, not alphabetical.
  np.testing.assert_array_equal(train.labels, [0, 0, 3, 4, 6])
  assert train.labels.dtype == np.int32
  assert train.images[0].mean() == 10 and train.images[1].mean() == 20
  assert train.images[3].mean() == 90
  np.testing.assert_array_equal(ds['PublicTest'].labels, [1, 5])
  assert ds.class_names == ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')


def test_colour_jpg_becomes_grayscale_luminance(tree):
  happy = _load(tree)['Training'].images[2]
  assert happy.shape == (48, 48, 1) and happy.dtype == np.uint8
  # ITU-R 601 luma of (200, 100, 50) is 124; JPEG may move it by a level or two.
  assert abs(float(happy.mean()) - 124) < 4


@pytest.mark.parametrize('size', [48, 24, 64])
def test_every_image_is_resized_to_the_requested_size(tree, size):
  ds = _load(tree, image_size=size)
  for split in ds.splits.values():
    assert split.images.shape[1:] == (size, size, 1)
  neutral = ds['Training'].images[4, ..., 0].astype(int)
  # The 100x80 image's dark and bright halves stay left and right.
  assert neutral[:, : size // 2 - 2].max() < 20
  assert neutral[:, size // 2 + 2 :].min() > 230


def test_test_folder_serves_both_test_splits(tree):
  ds = _load(tree)
  assert set(ds.splits) == {'Training', 'PublicTest', 'PrivateTest'}
  np.testing.assert_array_equal(ds['PublicTest'].images, ds['PrivateTest'].images)
  np.testing.assert_array_equal(ds['PublicTest'].labels, ds['PrivateTest'].labels)
  assert [ds['PublicTest'].images[i].mean() for i in range(2)] == [60, 150]


def test_second_load_comes_from_the_cache_and_a_change_rebuilds(tree, monkeypatch):
  first = _load(tree)
  real_decode = folders._decode

  def no_decode(*args):
    raise AssertionError('decoded again')

  monkeypatch.setattr(folders, '_decode', no_decode)
  second = _load(tree)
  np.testing.assert_array_equal(first['Training'].images, second['Training'].images)
  with pytest.raises(AssertionError, match='decoded again'):
    _load(tree, image_size=32)  # the size is part of the key
  monkeypatch.setattr(folders, '_decode', real_decode)
  _save_gray(tree / 'train' / 'fear' / 'f.png', 200)
  assert 2 in _load(tree)['Training'].labels.tolist()


def _break(root: pathlib.Path, how: str) -> str:
  """Damages the tree; returns the path the error message must name."""
  if how == 'root missing':
    return str(root / 'nowhere')
  if how == 'no train dir':
    os.rename(root / 'train', root / 'training')
    return str(root)
  if how == 'no test dir':
    os.rename(root / 'test', root / 'val')
    return str(root)
  if how == 'unknown class':
    _save_gray(root / 'train' / 'happpy' / 'h.png', 5)
    return str(root / 'train' / 'happpy')
  if how == 'empty class':
    (root / 'test' / 'fear').mkdir()
    return str(root / 'test' / 'fear')
  if how == 'corrupt image':
    (root / 'train' / 'sad' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    return str(root / 'train' / 'sad' / 'bad.png')
  if how == 'non-image file':
    (root / 'train' / 'angry' / 'notes.txt').write_text('hello')
    return str(root / 'train' / 'angry' / 'notes.txt')
  if how == 'no images':
    for d in (root / 'test').iterdir():
      for f in d.iterdir():
        f.unlink()
      d.rmdir()
    return str(root / 'test')
  raise ValueError(how)


@pytest.mark.parametrize(
  'how, pattern',
  [
    ('root missing', 'not found'),
    ('no train dir', 'no train/ directory'),
    ('no test dir', 'no test/ directory'),
    (
      'unknown class',
      "unknown class folder 'happpy'.*angry, disgust, fear, happy, sad, surprise, neutral",
    ),
    ('empty class', 'empty'),
    ('corrupt image', 'corrupt or unreadable image'),
    ('non-image file', 'not an image file'),
    ('no images', 'has no images'),
  ],
)
def test_malformed_trees_raise_one_line_data_errors(tree, how, pattern):
  path = _break(tree, how)
  root = pathlib.Path(path) if how == 'root missing' else tree
  with pytest.raises(DataError, match=pattern) as info:
    _load(root, cache_dir=tree.parent / 'cache')
  message = str(info.value)
  assert path in message and '\n' not in message
  # Nothing was cached for a broken tree.
  cache_dir = tree.parent / 'cache'
  assert not cache_dir.exists() or not any(cache_dir.glob('*.npz'))
