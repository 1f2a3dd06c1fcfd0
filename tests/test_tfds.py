"""The TFDS `fer2013` builder: built and read without TensorFlow, equal to the CSV loader."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import require

tfds = require('tensorflow_datasets')

from experiments import base  # noqa: E402
from fer_jax.data import datasets, ferplus, tfds_fer2013  # noqa: E402
from fer_jax.data.synthetic import write_synthetic_csv  # noqa: E402
from fer_jax.errors import ConfigError  # noqa: E402
from tests.conftest import REPO  # noqa: E402


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
  """fer2013.csv (24 / 8 / 8 synthetic rows) and a fer2013new.csv that matches it."""
  folder = tmp_path_factory.mktemp('manual')
  write_synthetic_csv(str(folder / 'fer2013.csv'), num_train=24, num_test=8, seed=3)
  rng = np.random.default_rng(0)
  usages = ['Training'] * 24 + ['PublicTest'] * 8 + ['PrivateTest'] * 8
  lines = [','.join(('Usage', 'Image name') + ferplus.VOTE_COLUMNS)]
  for i, usage in enumerate(usages):
    votes = rng.multinomial(10, rng.dirichlet(np.full(10, 0.3)))
    lines.append(f'{usage},fer{i:07d}.png,' + ','.join(map(str, votes)))
  (folder / 'fer2013new.csv').write_text('\n'.join(lines) + '\n')
  return folder


def _config(manual_dir, data_dir, **data):
  c = base.get_config()
  c.data.source = 'tfds'
  c.data.path = str(manual_dir / 'fer2013.csv')
  c.data.tfds_data_dir = str(data_dir)
  for k, v in data.items():
    c.data[k] = v
  return c


def _assert_same(a, b):
  assert a.class_names == b.class_names and list(a.splits) == list(b.splits)
  for name in a.splits:
    np.testing.assert_array_equal(a[name].images, b[name].images)
    np.testing.assert_array_equal(a[name].labels, b[name].labels)
    assert (a[name].soft_labels is None) == (b[name].soft_labels is None)
    if a[name].soft_labels is not None:
      np.testing.assert_array_equal(a[name].soft_labels, b[name].soft_labels)


@pytest.mark.parametrize('labels', ['fer2013', 'ferplus'])
def test_build_then_read_equals_the_csv_loader(manual_dir, tmp_path, labels):
  c = _config(manual_dir, tmp_path / 'tfds', labels=labels, ferplus_mode='probability')
  got = datasets.load_dataset(c.data, image_size=48)
  c.data.source = 'csv'
  _assert_same(got, datasets.load_dataset(c.data, image_size=48))
  assert {k: len(v) for k, v in got.splits.items()}['Training'] <= 24
  config = 'ferplus' if labels == 'ferplus' else 'default'
  built = tmp_path / 'tfds' / 'fer2013' / config / '1.0.0'
  files = sorted(os.listdir(built))
  assert [f for f in files if '.array_record-' in f] == [
    f'fer2013-{s}.array_record-00000-of-00001' for s in ('private_test', 'public_test', 'train')
  ]
  assert not [f for f in files if 'tfrecord' in f]
  assert 'tensorflow' not in sys.modules


def test_builder_features_and_splits(manual_dir, tmp_path):
  builder = tfds_fer2013.Fer2013(data_dir=str(tmp_path), config='ferplus')
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  info = builder.info
  assert info.features['image'].shape == (48, 48, 1) and info.features['image'].np_dtype == np.uint8
  assert info.features['label'].names == [
    'angry',
    'disgust',
    'fear',
    'happy',
    'sad',
    'surprise',
    'neutral',
  ]
  assert info.features['ferplus_votes'].shape == (10,)
  assert {k: v.num_examples for k, v in info.splits.items()} == {
    'train': 24,
    'public_test': 8,
    'private_test': 8,
  }
  source = tfds.data_source(
    'fer2013/ferplus',
    data_dir=str(tmp_path),
    download=False,
    builder_kwargs={'file_format': 'array_record'},
  )['public_test']
  example = source[3]  # TFDS's own decoding agrees with ours
  votes = ferplus.parse_ferplus_csv(manual_dir / 'fer2013new.csv').votes
  np.testing.assert_array_equal(example['ferplus_votes'], votes[24 + 3])
  assert example['image'].shape == (48, 48, 1) and example['image'].dtype == np.uint8


def test_built_dataset_is_read_without_the_manual_files(manual_dir, tmp_path):
  c = _config(manual_dir, tmp_path / 'tfds')
  first = datasets.load_dataset(c.data, image_size=48)
  c.data.path = str(tmp_path / 'elsewhere' / 'fer2013.csv')  # gone: the built copy is used
  _assert_same(first, datasets.load_dataset(c.data, image_size=48))


def test_missing_manual_files_are_config_errors(manual_dir, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  c = _config(empty, tmp_path / 'tfds')
  with pytest.raises(ConfigError, match=r'needs fer2013.csv or fer2013.csv.gz in the manual dir'):
    datasets.load_dataset(c.data, image_size=48)
  only_csv = tmp_path / 'only_csv'
  only_csv.mkdir()
  (only_csv / 'fer2013.csv').write_bytes((manual_dir / 'fer2013.csv').read_bytes())
  c = _config(only_csv, tmp_path / 'tfds', labels='ferplus')
  with pytest.raises(ConfigError, match=r'fer2013/ferplus needs fer2013new.csv'):
    datasets.load_dataset(c.data, image_size=48)


def test_builds_and_reads_with_tensorflow_unimportable(manual_dir, tmp_path):
  """In a fresh process where `import tensorflow` fails, as in a venv without TF."""
  script = textwrap.dedent(f"""
      import sys

      class Hide:  # every finder answers "not installed" for tensorflow
        def __init__(self, finder):
          self.finder = finder

        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] == 'tensorflow':
            return None
          return self.finder.find_spec(name, path, target)

      sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
      try:
        import tensorflow
        raise AssertionError('tensorflow was imported')
      except ModuleNotFoundError:
        pass
      from fer_jax.data import tfds_fer2013
      out = tfds_fer2013.read_fer2013(data_dir={str(tmp_path / 'tfds')!r},
                                      manual_dir={str(manual_dir)!r}, with_votes=True)
      assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow']
      print({{k: v['image'].shape[0] for k, v in out.items()}})
  """)
  out = subprocess.run(
    [sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "{'Training': 24, 'PublicTest': 8, 'PrivateTest': 8}" in out.stdout
