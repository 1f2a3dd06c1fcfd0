"""Confusion matrix, classification report and the text table."""

import warnings

import numpy as np
import pytest

from fer_jax import metrics


def test_hand_computed_example():
  labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
  preds = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
  cm = metrics.confusion_matrix(labels, preds, 3)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [1, 1, 3]])
  r = metrics.classification_report(cm)
  assert r['accuracy'] == pytest.approx(6 / 10)
  # precision = tp / column sum; recall = tp / row sum.
  assert r['per_class_precision'] == pytest.approx([2 / 3, 1 / 3, 3 / 4])
  assert r['per_class_recall'] == pytest.approx([2 / 3, 1 / 2, 3 / 5])
  assert r['per_class_accuracy'] == r['per_class_recall']
  f1 = [2 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2 * 0.75 * 0.6 / 1.35]
  assert f1 == pytest.approx([2 / 3, 0.4, 2 / 3])
  assert r['per_class_f1'] == pytest.approx(f1)
  assert r['macro_f1'] == pytest.approx((2 / 3 + 0.4 + 2 / 3) / 3)
  assert r['per_class_support'] == [3, 2, 5] and r['num_examples'] == 10


def test_perfect_predictions():
  labels = np.array([3, 1, 4, 1, 5, 0, 2, 6])
  r = metrics.classification_report(metrics.confusion_matrix(labels, labels, 7))
  assert r['accuracy'] == 1.0 and r['macro_f1'] == 1.0
  for key in ('per_class_precision', 'per_class_recall', 'per_class_f1'):
    assert r[key] == [1.0] * 7


def test_never_predicted_and_absent_classes_are_zero_not_nan():
  labels = [0, 0, 1, 1, 2]  # class 3 has no support
  preds = [0, 0, 0, 0, 0]  # classes 1..3 are never predicted
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    r = metrics.classification_report(metrics.confusion_matrix(labels, preds, 4))
  assert r['per_class_precision'] == pytest.approx([0.4, 0.0, 0.0, 0.0])
  assert r['per_class_recall'] == pytest.approx([1.0, 0.0, 0.0, 0.0])
  assert r['per_class_f1'][1:] == [0.0, 0.0, 0.0]
  assert r['macro_f1'] == pytest.approx(2 * 0.4 / 1.4 / 4)
  assert not any(np.isnan(v) for k, vs in r.items() if k.startswith('per_class') for v in vs)


def test_empty_input():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    r = metrics.classification_report(metrics.confusion_matrix([], [], 3))
  assert r['accuracy'] == 0.0 and r['macro_f1'] == 0.0 and r['num_examples'] == 0


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  k, n = 7, 500
  labels = rng.integers(0, k, n)
  preds = np.where(rng.random(n) < 0.4, labels, rng.integers(0, k, n))
  cm = metrics.confusion_matrix(labels, preds, k)
  ref = np.zeros((k, k), np.int64)
  for t, p in zip(labels, preds):
    ref[t, p] += 1
  np.testing.assert_array_equal(cm, ref)
  r = metrics.classification_report(cm)
  assert r['accuracy'] == pytest.approx(np.mean(labels == preds))
  for c in range(k):
    tp = np.sum((labels == c) & (preds == c))
    prec = tp / np.sum(preds == c)
    rec = tp / np.sum(labels == c)
    assert r['per_class_precision'][c] == pytest.approx(prec)
    assert r['per_class_recall'][c] == pytest.approx(rec)
    assert r['per_class_f1'][c] == pytest.approx(2 * prec * rec / (prec + rec))
  assert r['macro_f1'] == pytest.approx(np.mean(r['per_class_f1']))


def test_rejects_bad_input():
  with pytest.raises(ValueError, match='length'):
    metrics.confusion_matrix([0, 1], [0], 2)
  with pytest.raises(ValueError, match='labels'):
    metrics.confusion_matrix([0, 2], [0, 1], 2)
  with pytest.raises(ValueError, match='preds'):
    metrics.confusion_matrix([0, 1], [-1, 1], 2)


def test_format_table():
  names = ('angry', 'disgust', 'fear')
  r = metrics.classification_report(metrics.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3))
  table = metrics.format_table(r, names)
  lines = table.splitlines()
  assert lines[0].split() == ['class', 'precision', 'recall', 'f1', 'support']
  assert len({len(line) for line in lines[:-1]}) == 1  # fixed width rows
  assert lines[2].split() == ['angry', '0.5000', '0.5000', '0.5000', '2']
  assert lines[3].split() == ['disgust', '0.5000', '1.0000', '0.6667', '1']
  assert 'accuracy 0.6000' in lines[-1] and 'macro_f1' in lines[-1] and 'n=5' in lines[-1]
  with pytest.raises(ValueError):
    metrics.format_table(r, names[:2])
