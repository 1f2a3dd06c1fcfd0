"""The TFDS dataset `fer2013`, built and read without TensorFlow.

`Fer2013` is a `tfds.core.GeneratorBasedBuilder` (manual download: fer2013.csv in the manual
dir) whose examples come from our own CSV parser. It writes `array_record` files, which
tensorflow-datasets writes and reads (`tfds.data_source`) with numpy alone, so neither
building nor reading imports TensorFlow. Examples keep the CSV's row order (shuffling is
disabled), so a split read back equals the CSV loader's split.

Configs: `fer2013/default` (image, label) and `fer2013/ferplus`, which adds the ten FER+
vote counts (`ferplus_votes`, needs fer2013new.csv in the manual dir as well). The built
dataset is not rebuilt when the CSV changes: delete `<data_dir>/fer2013` to rebuild it.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.proto import tf_example_pb2

from fer_jax.data import ferplus
from fer_jax.data.fer2013_csv import IMAGE_SIZE, parse_fer2013_csv
from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES
from fer_jax.errors import ConfigError, DataError

NAME = 'fer2013'
# TFDS split name -> FER2013 Usage.
SPLITS = {'train': 'Training', 'public_test': 'PublicTest', 'private_test': 'PrivateTest'}
CSV_NAMES = ('fer2013.csv', 'fer2013.csv.gz')
FILE_FORMAT = 'array_record'

_HOMEPAGE = (
  'https://www.kaggle.com/c/'
  'challenges-in-representation-learning-facial-expression-recognition-challenge'
)
_CITATION = """@article{goodfellow2013challenges,
  title={Challenges in Representation Learning: A report on three machine learning contests},
  author={Goodfellow, Ian J. and Erhan, Dumitru and Carrier, Pierre Luc and Courville, Aaron
          and Mirza, Mehdi and Hamner, Ben and Cukierski, Will and Tang, Yichuan and Thaler,
          David and Lee, Dong-Hyun and others},
  journal={arXiv preprint arXiv:1307.0414},
  year={2013}
}"""


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013: 35,887 48x48 grayscale faces labelled with one of 7 emotions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name='default', description='Images and FER2013 labels.'),
    tfds.core.BuilderConfig(
      name='ferplus', description='Images, FER2013 labels and the FER+ vote counts.'
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  FER2013 comes from the Kaggle competition "Challenges in Representation Learning: Facial
  Expression Recognition Challenge" ({_HOMEPAGE}): download fer2013.csv (also inside
  fer2013.tar.gz) and place fer2013.csv or fer2013.csv.gz in the manual dir. For the
  'ferplus' config also place fer2013new.csv there, the FER+ votes from
  https://github.com/microsoft/FERPlus.
  """

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # array_record by default: TFRecord files would need TensorFlow to read.
    super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      # Raw bytes, not TFDS's default int64 list: decoding is a single copy.
      'image': tfds.features.Tensor(
        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      ),
      'label': tfds.features.ClassLabel(names=list(FER2013_CLASSES)),
    }
    if self.builder_config.name == 'ferplus':
      features['ferplus_votes'] = tfds.features.Tensor(
        shape=(len(ferplus.VOTE_COLUMNS),), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'FER2013 facial-expression images; ferplus_votes are the counts of ten '
        f'annotators over {", ".join(ferplus.VOTE_COLUMNS)}.'
      ),
      features=tfds.features.FeaturesDict(features),
      supervised_keys=('image', 'label'),
      homepage=_HOMEPAGE,
      citation=_CITATION,
      disable_shuffling=True,  # keep the CSV's order
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    found = [
      os.path.join(manual_dir, n) for n in CSV_NAMES if os.path.isfile(os.path.join(manual_dir, n))
    ]
    if not found:
      raise DataError(
        f'{manual_dir} has none of {", ".join(CSV_NAMES)}: '
        f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}'
      )
    parsed = parse_fer2013_csv(found[0])
    votes = None
    if self.builder_config.name == 'ferplus':
      votes_path = os.path.join(manual_dir, ferplus.FILE_NAME)
      parsed_votes = ferplus.parse_ferplus_csv(votes_path)
      ferplus.check_rows_match(parsed_votes, votes_path, parsed.usage, found[0])
      votes = parsed_votes.votes
    return {
      split: self._generate_examples(
        parsed.images, parsed.labels, np.flatnonzero(parsed.usage == FER2013_USAGES.index(u)), votes
      )
      for split, u in SPLITS.items()
    }

  def _generate_examples(
    self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, votes: np.ndarray | None
  ):
    for i in rows.tolist():
      example = {'image': images[i][..., None], 'label': int(labels[i])}
      if votes is not None:
        example['ferplus_votes'] = votes[i]
      yield i, example  # the CSV row: with shuffling disabled, records are in this order


def _decode(records: list[bytes], with_votes: bool) -> dict[str, np.ndarray]:
  """Serialized examples (tf.train.Example protos) -> stacked arrays, checked for size."""
  keys = ('image', 'ferplus_votes') if with_votes else ('image',)
  raw: dict[str, list[bytes]] = {k: [] for k in keys}
  labels = np.empty(len(records), np.int32)
  for i, record in enumerate(records):
    feature = tf_example_pb2.Example.FromString(record).features.feature
    for k in keys:
      raw[k].append(feature[k].bytes_list.value[0])
    labels[i] = feature['label'].int64_list.value[0]
  shapes = {
    'image': ((IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8),
    'ferplus_votes': ((len(ferplus.VOTE_COLUMNS),), np.int32),
  }
  out = {'label': labels}
  for k in keys:
    shape, dtype = shapes[k]
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if any(len(b) != size for b in raw[k]):
      raise DataError(
        f'TFDS {NAME}: a {k!r} record is not {size} bytes; rebuild the dataset (delete its folder)'
      )
    out[k] = np.frombuffer(bytearray().join(raw[k]), dtype).reshape(len(records), *shape)
  return out


def default_data_dir(cache_dir: str) -> str:
  return os.path.join(cache_dir, 'tfds')


def manual_dir_of(path: str) -> str:
  """config.data.path names the CSV in the manual dir, or the manual dir itself."""
  path = os.path.abspath(os.path.expanduser(path))
  return path if os.path.isdir(path) else os.path.dirname(path)


def read_fer2013(
  *, data_dir: str, manual_dir: str, with_votes: bool = False
) -> dict[str, dict[str, np.ndarray]]:
  """{FER2013 Usage: {'image', 'label'[, 'ferplus_votes']}}, building the dataset if needed.

  Reads through `tfds.data_source` (array_record, random access, no TensorFlow).
  """
  config = 'ferplus' if with_votes else 'default'
  builder = Fer2013(data_dir=data_dir, config=config)
  if not builder.is_prepared():
    missing = []
    if not any(os.path.isfile(os.path.join(manual_dir, n)) for n in CSV_NAMES):
      missing.append(' or '.join(CSV_NAMES))
    if with_votes and not os.path.isfile(os.path.join(manual_dir, ferplus.FILE_NAME)):
      missing.append(ferplus.FILE_NAME)
    if missing:
      raise ConfigError(
        f'building the TFDS dataset {NAME}/{config} needs {" and ".join(missing)} '
        f'in the manual dir {manual_dir} (the folder of config.data.path)'
      )
    logging.info('building TFDS %s/%s in %s from %s', NAME, config, data_dir, manual_dir)
    t = time.perf_counter()
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    )
    logging.info('built TFDS %s/%s in %.1f s', NAME, config, time.perf_counter() - t)
  t = time.perf_counter()
  # Raw records, decoded below in bulk: TFDS's per-example numpy decoding is 4x slower.
  sources = tfds.data_source(
    f'{NAME}/{config}',
    data_dir=data_dir,
    download=False,
    builder_kwargs={'file_format': FILE_FORMAT},
    deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
  )
  out = {
    usage: _decode(sources[split].__getitems__(range(len(sources[split]))), with_votes)
    for split, usage in SPLITS.items()
  }
  logging.info(
    'read TFDS %s/%s (%d examples) in %.2f s',
    NAME,
    config,
    sum(len(s['label']) for s in out.values()),
    time.perf_counter() - t,
  )
  return out
