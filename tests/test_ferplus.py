"""FER+ labels: the vote rule, the fer2013new.csv parser, config wiring, training end to end."""

import gzip
import json

import numpy as np
import pytest

from experiments import base
from fer_jax.data import datasets, ferplus, pipeline
from fer_jax.data.synthetic import write_synthetic_csv
from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES, Split
from fer_jax.errors import ConfigError, DataError
from tests.conftest import SHARED_FER2013, require

HEADER = ','.join(
  (
    'Usage',
    'Image name',
    'neutral',
    'happiness',
    'surprise',
    'sadness',
    'anger',
    'disgust',
    'fear',
    'contempt',
    'unknown',
    'NF',
  )
)
#        neu hap sur sad ang dis fea con unk NF
VOTES = [
  [6, 2, 0, 0, 1, 1, 0, 0, 0, 0],  # 0 clear neutral; the 1s are outliers
  [4, 4, 0, 0, 0, 0, 0, 0, 2, 0],  # 1 tie: no majority; distribution .5/.5
  [5, 3, 2, 0, 0, 0, 0, 0, 0, 0],  # 2 exactly half: no majority
  [4, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # 3 majority only once the single votes are removed
  [2, 0, 0, 0, 0, 0, 0, 0, 6, 2],  # 4 unknown on top
  [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # 5 not a face
  [3, 0, 0, 0, 0, 0, 0, 0, 3, 4],  # 6 NF above the best emotion
  [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # 7 all outliers: nothing left
  [2, 0, 0, 0, 0, 0, 0, 8, 0, 0],  # 8 contempt
  [0, 2, 0, 0, 0, 0, 0, 0, 3, 0],  # 9 emotion below unknown
]


def test_rule_eight_classes():
  lab = ferplus.ferplus_labels(np.array(VOTES), 8)
  assert (
    lab.class_names
    == ferplus.FERPLUS_CLASSES
    == ('neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt')
  )
  assert np.flatnonzero(lab.majority_ok).tolist() == [0, 3, 8]
  assert np.flatnonzero(lab.probability_ok).tolist() == [0, 1, 2, 3, 8]
  assert lab.labels[[0, 1, 3, 8]].tolist() == [0, 0, 0, 7]
  np.testing.assert_allclose(lab.soft_labels[0], [0.75, 0.25, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(lab.soft_labels[1], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(lab.soft_labels[2], [0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(lab.soft_labels[3], [1, 0, 0, 0, 0, 0, 0, 0])
  assert lab.soft_labels.dtype == np.float32 and not lab.soft_labels[~lab.probability_ok].any()


def test_rule_seven_classes_maps_onto_fer2013():
  lab = ferplus.ferplus_labels(np.array(VOTES), 7)
  assert lab.class_names == FER2013_CLASSES
  # Contempt's votes are dropped before the rule: image 8 becomes a 2-vote neutral.
  assert np.flatnonzero(lab.majority_ok).tolist() == [0, 3, 8]
  assert lab.labels[8] == FER2013_CLASSES.index('neutral')
  to_fer2013 = {
    'neutral': 'neutral',
    'happiness': 'happy',
    'surprise': 'surprise',
    'sadness': 'sad',
    'anger': 'angry',
    'disgust': 'disgust',
    'fear': 'fear',
  }
  for column, name in enumerate(ferplus.VOTE_COLUMNS[:7]):
    votes = np.zeros((1, 10), int)
    votes[0, column] = 7
    votes[0, 1 if column != 1 else 0] = 3
    lab = ferplus.ferplus_labels(votes, 7)
    assert lab.majority_ok[0] and FER2013_CLASSES[lab.labels[0]] == to_fer2013[name]
    assert FER2013_CLASSES[int(np.argmax(lab.soft_labels[0]))] == to_fer2013[name]
    assert lab.soft_labels[0].max() == pytest.approx(0.7)


def test_dataset_uses_majority_on_evaluation_splits():
  votes = np.array(VOTES * 3)
  usage = np.repeat(np.arange(3, dtype=np.int8), len(VOTES))
  images = np.arange(len(votes), dtype=np.uint8)[:, None, None, None] * np.ones(
    (1, 4, 4, 1), np.uint8
  )
  ds = ferplus.ferplus_dataset(images, usage, votes, mode='probability')
  train = ds['Training']
  assert train.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 8]
  assert train.soft_labels.shape == (5, 8)
  np.testing.assert_allclose(train.soft_labels.sum(axis=1), 1, rtol=1e-6)
  for name, first in (('PublicTest', 10), ('PrivateTest', 20)):
    assert ds[name].soft_labels is None
    assert ds[name].images[:, 0, 0, 0].tolist() == [first, first + 3, first + 8]
    assert ds[name].labels.tolist() == [0, 0, 7]
  majority = ferplus.ferplus_dataset(images, usage, votes, mode='majority')
  assert majority['Training'].soft_labels is None and len(majority['Training']) == 3


def test_split_checks_soft_labels_and_pipeline_passes_them():
  images = np.zeros((6, 4, 4, 1), np.uint8)
  labels = np.arange(6, dtype=np.int32) % 2
  with pytest.raises(ValueError, match='soft_labels'):
    Split(images=images, labels=labels, soft_labels=np.zeros((5, 2), np.float32))
  soft = np.eye(2, dtype=np.float32)[labels] * 0.5 + 0.25
  split = Split(images=images, labels=labels, soft_labels=soft)
  batch = next(iter(pipeline.make_train_iterator(split, global_batch=4, num_epochs=1, seed=0)))
  np.testing.assert_array_equal(batch['soft_label'], soft[np.argmax(batch['soft_label'], 1)])
  np.testing.assert_array_equal(np.argmax(batch['soft_label'], 1), batch['label'])
  last = list(pipeline.eval_batches(split, global_batch=4))[-1]
  assert last['soft_label'].shape == (4, 2) and last['mask'].tolist() == [1, 1, 0, 0]


def test_train_step_uses_soft_labels():
  import jax

  from fer_jax import augment
  from fer_jax.train import make_step_context
  from fer_jax.train_step import create_train_state, make_optimizer, train_step

  c = base.get_config()
  c.model.dropout = (0.0, 0.0, 0.0)
  c.augment.enabled = False
  c.train.l2 = 0.0
  ctx = make_step_context(c, num_classes=8, weights=np.ones(8, np.float32), mean=0.5, std=0.25)
  state = create_train_state(ctx, make_optimizer(c.train, steps_per_epoch=10))
  rng = np.random.default_rng(0)
  soft = rng.dirichlet(np.ones(8), 4).astype(np.float32)
  batch = {
    'image': rng.integers(0, 256, (4, 48, 48, 1), dtype=np.uint8),
    'label': np.argmax(soft, 1).astype(np.int32),
    'soft_label': soft,
  }
  step = jax.jit(lambda s, b: train_step(s, b, ctx)[1]['data_loss'])
  with_soft = step(state, batch)
  hard = step(state, {k: batch[k] for k in ('image', 'label')})
  x = augment.preprocess_batch(
    batch['image'], None, c.augment, out_size=48, train=False, mean=0.5, std=0.25
  )
  logp = np.asarray(jax.nn.log_softmax(ctx.model.apply({'params': state.params}, x, train=False)))
  assert float(with_soft) == pytest.approx(-np.mean(np.sum(soft * logp, 1)), rel=1e-5)
  assert float(hard) == pytest.approx(-np.mean(logp[np.arange(4), batch['label']]), rel=1e-5)


# ---------------------------------------------------------------------------
# The parser.


def _write(path, rows, *, header=HEADER, newline='\n', gz=False, final_newline=True):
  text = newline.join([header] + rows) + (newline if final_newline else '')
  data = text.encode()
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def _rows(usages, votes):
  return [
    f'{u},fer{i:07d}.png,' + ','.join(map(str, v)) for i, (u, v) in enumerate(zip(usages, votes))
  ]


def test_parser_fast_and_tolerant_paths_agree(tmp_path):
  usages = ['Training'] * 6 + ['PublicTest'] * 2 + ['PrivateTest'] * 2
  votes = [[10, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 100]] + VOTES[:8]
  rows = _rows(usages, votes)
  rows[1] = rows[1].replace('fer0000001.png', '')  # 173 real rows have no image name
  canonical = ferplus.parse_ferplus_csv(_write(tmp_path / 'a.csv', rows))
  np.testing.assert_array_equal(canonical.votes, votes)
  assert canonical.usage.tolist() == [0] * 6 + [1] * 2 + [2] * 2
  assert canonical.lines.tolist() == list(range(2, 12))
  variants = {
    'crlf': _write(tmp_path / 'b.csv', rows, newline='\r\n'),
    'gz_no_final_newline': _write(tmp_path / 'c.csv', rows, gz=True, final_newline=False),
    'quotes_spaces_blank': _write(
      tmp_path / 'd.csv',
      [rows[0].replace('Training', '"Training"'), ''] + [r.replace(',', ', ') for r in rows[1:]],
    ),
  }
  for name, path in variants.items():
    parsed = ferplus.parse_ferplus_csv(path)
    np.testing.assert_array_equal(parsed.votes, canonical.votes, err_msg=name)
    np.testing.assert_array_equal(parsed.usage, canonical.usage, err_msg=name)
  assert ferplus.parse_ferplus_csv(variants['quotes_spaces_blank']).lines.tolist() == (
    [2] + list(range(4, 13))
  )


@pytest.mark.parametrize(
  'edit,match',
  [
    (lambda rows: rows, None),
    (lambda rows: rows[:2] + [rows[2] + ',3'] + rows[3:], r'line 4: 13 columns'),
    (lambda rows: [rows[0].replace(',6,2,', ',x,2,')] + rows[1:], r"line 2: neutral votes 'x'"),
    (lambda rows: rows[:3] + [rows[3][:-1] + '-1'] + rows[4:], r"line 5: NF votes '-1'"),
    (
      lambda rows: rows[:2] + [rows[2].replace('Training', 'Train')] + rows[3:],
      r"line 4: Usage 'Train'",
    ),
    (
      lambda rows: rows[:2] + [rows[2].replace(',0,0,', ',1.5,0,', 1)] + rows[3:],
      r"line 4: .* votes '1.5'",
    ),
  ],
)
def test_parser_errors_name_the_line(tmp_path, edit, match):
  rows = _rows(['Training'] * 5, VOTES[:5])
  path = _write(tmp_path / 'f.csv', edit(rows))
  if match is None:
    assert len(ferplus.parse_ferplus_csv(path).usage) == 5
    return
  with pytest.raises(DataError, match=match) as e:
    ferplus.parse_ferplus_csv(path)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_parser_file_errors(tmp_path):
  with pytest.raises(DataError, match='line 1: header'):
    ferplus.parse_ferplus_csv(_write(tmp_path / 'h.csv', [], header='emotion,pixels,Usage'))
  with pytest.raises(DataError, match='no data rows'):
    ferplus.parse_ferplus_csv(_write(tmp_path / 'e.csv', []))
  with pytest.raises(DataError, match='not found.*FERPlus'):
    ferplus.parse_ferplus_csv(tmp_path / 'missing.csv')
  with pytest.raises(DataError, match='directory'):
    ferplus.parse_ferplus_csv(tmp_path)


# ---------------------------------------------------------------------------
# Loading with the FER2013 CSV, through the config.


def _synthetic_votes(labels, rng):
  """Votes whose majority is mostly the synthetic label (mapped to FER+), some NF, some contempt."""
  fer2013_to_column = [
    ferplus.VOTE_COLUMNS.index(n)
    for n in ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')
  ]
  votes = np.zeros((len(labels), 10), np.int32)
  for i, label in enumerate(labels):
    top = 7 if i % 11 == 5 else 9 if i % 13 == 7 else fer2013_to_column[label]
    votes[i, top] = rng.integers(5, 9)
    votes[i] += rng.multinomial(10 - votes[i, top], np.full(10, 0.1)).astype(np.int32)
  return votes


@pytest.fixture(scope='module')
def ferplus_data(tmp_path_factory):
  """A synthetic fer2013.csv (384 / 100 / 100 rows) and a matching fer2013new.csv beside it."""
  folder = tmp_path_factory.mktemp('ferplus_data')
  csv = folder / 'fer2013.csv'
  write_synthetic_csv(str(csv), num_train=384, num_test=100, seed=0)
  from fer_jax.data.fer2013_csv import parse_fer2013_csv

  parsed = parse_fer2013_csv(csv)
  votes = _synthetic_votes(parsed.labels, np.random.default_rng(0))
  usages = [FER2013_USAGES[u] for u in parsed.usage]
  _write(folder / 'fer2013new.csv', _rows(usages, votes))
  return csv, votes, parsed


def _config(csv, **data):
  c = base.get_config()
  c.data.path = str(csv)
  c.data.labels = 'ferplus'
  for k, v in data.items():
    c.data[k] = v
  return c


def test_load_dataset_matches_the_rule(ferplus_data):
  csv, votes, parsed = ferplus_data
  ds = datasets.load_dataset(_config(csv, ferplus_mode='probability').data, image_size=48)
  lab = ferplus.ferplus_labels(votes, 8)
  assert ds.class_names == ferplus.FERPLUS_CLASSES
  train = (parsed.usage == 0) & lab.probability_ok
  np.testing.assert_array_equal(ds['Training'].images[..., 0], parsed.images[train])
  np.testing.assert_array_equal(ds['Training'].soft_labels, lab.soft_labels[train])
  test = (parsed.usage == 2) & lab.majority_ok
  np.testing.assert_array_equal(ds['PrivateTest'].labels, lab.labels[test])
  assert 0 < len(ds['PrivateTest']) < 100 and set(ds['Training'].labels.tolist()) >= {7}
  seven = datasets.load_dataset(_config(csv, ferplus_classes=7).data, image_size=48)
  assert seven.class_names == FER2013_CLASSES and seven['Training'].soft_labels is None


def test_mismatched_files_are_one_line_errors(ferplus_data, tmp_path):
  csv, votes, parsed = ferplus_data
  usages = [FER2013_USAGES[u] for u in parsed.usage]
  short = _write(tmp_path / 'short.csv', _rows(usages[:-1], votes[:-1]))
  with pytest.raises(DataError, match=r'has 583 data rows but .* has 584'):
    datasets.load_dataset(_config(csv, ferplus_path=str(short)).data, image_size=48)
  usages[400] = 'Training'
  swapped = _write(tmp_path / 'swapped.csv', _rows(usages, votes))
  with pytest.raises(
    DataError,
    match=r'swapped.csv line 402: Usage Training but data row 401 '
    r'of .* is PublicTest',
  ):
    datasets.load_dataset(_config(csv, ferplus_path=str(swapped)).data, image_size=48)


def test_config_errors(tmp_path, ferplus_data):
  alone = tmp_path / 'fer2013.csv'
  alone.write_bytes(ferplus_data[0].read_bytes())
  with pytest.raises(ConfigError, match=f'{tmp_path}/fer2013new.csv not found'):
    datasets.load_dataset(_config(alone).data, image_size=48)
  c = _config(alone)
  c.data.source = 'synthetic'
  with pytest.raises(ConfigError, match="needs config.data.source 'csv' or 'tfds'"):
    datasets.load_dataset(c.data, image_size=48)
  from fer_jax.config_checks import validate_config

  for key, value in (('ferplus_mode', 'soft'), ('ferplus_classes', 6), ('labels', 'fer+')):
    c = _config(alone, **{key: value})
    with pytest.raises(ConfigError, match=key):
      validate_config(c)


def test_real_file_counts():
  votes_path = SHARED_FER2013.parent / 'fer2013new.csv'
  if not votes_path.exists():
    pytest.skip(f'{votes_path} not present')
  votes = ferplus.parse_ferplus_csv(votes_path)
  assert np.bincount(votes.usage).tolist() == [28709, 3589, 3589]
  counts = {}
  for k in (8, 7):
    lab = ferplus.ferplus_labels(votes.votes, k)
    for mode, ok in (('majority', lab.majority_ok), ('probability', lab.probability_ok)):
      counts[k, mode] = [int(np.sum(ok & (votes.usage == i))) for i in range(3)]
  assert counts[8, 'majority'] == [25060, 3199, 3153]
  assert counts[8, 'probability'][0] == 28153
  assert counts[7, 'majority'] == [25212, 3225, 3172]
  assert counts[7, 'probability'][0] == 28097
  lab = ferplus.ferplus_labels(votes.votes, 8)
  test_counts = np.bincount(lab.labels[lab.majority_ok & (votes.usage == 2)], minlength=8)
  assert test_counts.tolist() == [1090, 893, 396, 384, 273, 18, 83, 16]


def test_real_files_load(fer2013_path):
  votes_path = fer2013_path.parent / 'fer2013new.csv'
  if not votes_path.exists():
    pytest.skip(f'{votes_path} not present')
  ds = datasets.load_dataset(_config(fer2013_path).data, image_size=48)
  assert ds.class_names == ferplus.FERPLUS_CLASSES
  assert {k: len(v) for k, v in ds.splits.items()} == {
    'Training': 25060,
    'PublicTest': 3199,
    'PrivateTest': 3153,
  }


# ---------------------------------------------------------------------------
# End to end: 8 classes in probability mode, then evaluate, report and predict.


def test_train_report_predict_with_eight_classes(ferplus_data, tmp_path):
  from fer_jax import report, train, trained_model

  csv = ferplus_data[0]
  c = _config(csv, ferplus_mode='probability')
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.epochs = 1
  c.train.log_every_steps = 4
  results = train.train_and_evaluate(c, str(tmp_path / 'w'))
  cm = np.asarray(results['splits']['PrivateTest']['confusion_matrix'])
  assert cm.shape == (8, 8)
  on_disk = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert on_disk['config']['data']['labels'] == 'ferplus'

  trained = trained_model.load(str(tmp_path / 'w'))
  assert trained.class_names == ferplus.FERPLUS_CLASSES
  index = report.build_report(trained, str(tmp_path / 'report'), split='PrivateTest')
  text = open(index).read()
  accuracy = results['splits']['PrivateTest']['accuracy']
  assert '| contempt |' in text and f'accuracy **{accuracy:.4f}**' in text

  require('cv2')
  from fer_jax import predict

  p = predict.Predictor(str(tmp_path / 'w'), detector='none')
  (face,) = p.predict_image(ferplus_data[2].images[0])
  assert list(face['probabilities']) == list(ferplus.FERPLUS_CLASSES)
  assert face['emotion'] in ferplus.FERPLUS_CLASSES
