"""On-disk array cache: hits, invalidation, atomic writes and recovery from bad entries."""

import logging
import os

import numpy as np
import pytest

from fer_jax.data import cache


class Builder:
  """A build() that counts its calls and returns fresh arrays derived from `value`."""

  def __init__(self, value: int = 1):
    self.calls = 0
    self.value = value

  def __call__(self):
    self.calls += 1
    arrays = {
      'images': np.full((5, 4, 4), self.value, np.uint8),
      'labels': np.arange(5, dtype=np.int32) * self.value,
    }
    return arrays, {'skipped': {'reason': self.value}, 'n': 5}


def get(source, cache_dir, build, **kwargs):
  kwargs = {'kind': 'test', 'version': 1, **kwargs}
  return cache.cached_arrays(str(source), cache_dir=str(cache_dir), build=build, **kwargs)


@pytest.fixture
def source(tmp_path):
  path = tmp_path / 'source.csv'
  path.write_text('some data\n')
  return path


def entries(cache_dir):
  return sorted(os.listdir(cache_dir))


def test_hit_returns_identical_arrays_without_building(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  build = Builder()
  arrays, meta = get(source, cache_dir, build)
  again, meta_again = get(source, cache_dir, build)
  assert build.calls == 1
  assert meta == meta_again == {'skipped': {'reason': 1}, 'n': 5}
  assert set(again) == {'images', 'labels'}
  for name in arrays:
    assert again[name].dtype == arrays[name].dtype
    np.testing.assert_array_equal(again[name], arrays[name])
  assert len(entries(cache_dir)) == 1 and entries(cache_dir)[0].endswith('.npz')


def test_touching_the_source_invalidates(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  get(source, cache_dir, Builder(1))
  st = os.stat(source)
  os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  arrays, meta = get(source, cache_dir, Builder(2))
  assert meta['skipped'] == {'reason': 2} and arrays['images'][0, 0, 0] == 2
  assert len(entries(cache_dir)) == 1  # the stale entry is removed


def test_changing_the_source_size_invalidates(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  st = os.stat(source)
  get(source, cache_dir, Builder(1))
  source.write_text('other, longer data\n')
  os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: size alone must count
  build = Builder(3)
  get(source, cache_dir, build)
  assert build.calls == 1


def test_directory_source_listing_invalidates(tmp_path):
  root = tmp_path / 'images'
  (root / 'happy').mkdir(parents=True)
  (root / 'happy' / 'a.png').write_bytes(b'1234')
  cache_dir = tmp_path / 'cache'
  build = Builder()
  get(root, cache_dir, build)
  get(root, cache_dir, build)
  assert build.calls == 1
  # A changed file deep inside does not change the root directory's own mtime.
  dir_stat = os.stat(root)
  (root / 'happy' / 'a.png').write_bytes(b'123456')
  os.utime(root, ns=(dir_stat.st_atime_ns, dir_stat.st_mtime_ns))
  get(root, cache_dir, build)
  assert build.calls == 2
  (root / 'happy' / 'b.png').write_bytes(b'1')
  get(root, cache_dir, build)
  assert build.calls == 3


def test_kind_version_and_params_are_part_of_the_key(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  build = Builder()
  get(source, cache_dir, build)
  get(source, cache_dir, build, version=2)
  get(source, cache_dir, build, kind='other')
  get(source, cache_dir, build, kind='other', params={'image_size': 48})
  get(source, cache_dir, build, kind='other', params={'image_size': 48})
  assert build.calls == 4


def test_entries_for_other_params_coexist(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  build = Builder()
  for size in (48, 150, 48, 150):
    get(source, cache_dir, build, params={'image_size': size})
  assert build.calls == 2 and len(entries(cache_dir)) == 2
  get(source, cache_dir, build, params={'image_size': 48}, version=2)  # replaces v1's entry
  assert build.calls == 3 and len(entries(cache_dir)) == 2


def test_build_that_raises_writes_nothing(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  cache_dir.mkdir()

  def build():
    raise RuntimeError('bad data')

  with pytest.raises(RuntimeError, match='bad data'):
    get(source, cache_dir, build)
  assert entries(cache_dir) == []


def test_crash_while_writing_leaves_nothing(source, tmp_path, monkeypatch):
  cache_dir = tmp_path / 'cache'

  def broken_savez(f, **arrays):
    f.write(b'PK\x03\x04 partial')
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'savez', broken_savez)
  with pytest.raises(KeyboardInterrupt):
    get(source, cache_dir, Builder())
  assert entries(cache_dir) == []
  monkeypatch.undo()
  build = Builder()
  get(source, cache_dir, build)
  assert build.calls == 1


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_unreadable_entry_is_rebuilt(source, tmp_path, caplog, damage):
  cache_dir = tmp_path / 'cache'
  get(source, cache_dir, Builder())
  [name] = entries(cache_dir)
  path = cache_dir / name
  data = path.read_bytes()
  path.write_bytes(
    {'truncate': data[: len(data) // 2], 'garbage': b'not a zip' * 10, 'empty': b''}[damage]
  )
  build = Builder(7)
  with caplog.at_level(logging.WARNING):
    arrays, meta = get(source, cache_dir, build)
  assert build.calls == 1 and meta['skipped'] == {'reason': 7}
  assert 'unreadable' in caplog.text and name in caplog.text
  # Overwritten with a good entry: the next call is a hit.
  again, _ = get(source, cache_dir, build)
  assert build.calls == 1
  np.testing.assert_array_equal(again['images'], arrays['images'])


def test_no_temporary_files_left(source, tmp_path):
  cache_dir = tmp_path / 'cache'
  for value in range(3):
    source.write_text('x' * (value + 1))
    get(source, cache_dir, Builder(value))
  assert len(entries(cache_dir)) == 1
  assert not [n for n in entries(cache_dir) if n.startswith('.tmp')]


def test_unwritable_cache_dir_still_returns_arrays(source, tmp_path, caplog):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with caplog.at_level(logging.WARNING):
    arrays, meta = get(source, blocker / 'cache', Builder())
  assert meta['n'] == 5 and arrays['labels'].shape == (5,)
  assert 'could not write cache file' in caplog.text


def test_reserved_array_names_rejected(source, tmp_path):
  with pytest.raises(ValueError, match='must not start with'):
    get(source, tmp_path / 'cache', lambda: ({'__meta__': np.zeros(1)}, {}))


def test_default_cache_dir(tmp_path, monkeypatch):
  target = tmp_path / 'x' / 'y'
  monkeypatch.setenv('FER_JAX_CACHE', str(target))
  assert cache.default_cache_dir() == str(target)
  assert target.is_dir()
  monkeypatch.delenv('FER_JAX_CACHE')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cache.default_cache_dir() == str(tmp_path / 'home' / '.cache' / 'fer_jax')
  assert (tmp_path / 'home' / '.cache' / 'fer_jax').is_dir()
