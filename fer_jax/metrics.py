"""Host-side evaluation metrics: confusion matrix, per-class report, text table.

Plain numpy on gathered predictions, so results do not depend on how the eval
batch was sharded. Undefined ratios (a class with no support or never
predicted) are reported as 0.0 rather than NaN, so JSON logs and
"best checkpoint" comparisons never see NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """int64 (K, K) counts; rows are true classes, columns predicted classes."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  preds = np.asarray(preds).reshape(-1).astype(np.int64)
  if labels.shape != preds.shape:
    raise ValueError(f'labels and preds differ in length: {labels.shape[0]} vs {preds.shape[0]}')
  for name, v in (('labels', labels), ('preds', preds)):
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes}), got [{v.min()}, {v.max()}]')
  flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den elementwise, 0 where den == 0 (no NaN, no warnings)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.zeros(np.broadcast(num, den).shape, np.float64)
  np.divide(num, den, out=out, where=den != 0)
  return out


def classification_report(cm: np.ndarray) -> dict[str, Any]:
  """Accuracy, macro F1 and per-class precision / recall / F1 from a confusion matrix.

  `per_class_accuracy` is the per-class recall (the fraction of each true class
  classified correctly), the number usually quoted per emotion. `macro_f1` is
  the unweighted mean of the per-class F1 over all K classes.
  """
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square, got shape {cm.shape}')
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2 * precision * recall, precision + recall)
  total = int(cm.sum())
  return {
    'accuracy': float(_safe_div(tp.sum(), total)),
    'macro_f1': float(f1.mean()) if f1.size else 0.0,
    'num_examples': total,
    'per_class_accuracy': recall.tolist(),
    'per_class_precision': precision.tolist(),
    'per_class_recall': recall.tolist(),
    'per_class_f1': f1.tolist(),
    'per_class_support': support.tolist(),
  }


def format_table(report: dict[str, Any], class_names: Sequence[str]) -> str:
  """A fixed-width per-class table plus the accuracy / macro-F1 summary line."""
  k = len(report['per_class_f1'])
  if len(class_names) != k:
    raise ValueError(f'{len(class_names)} class names for a {k}-class report')
  width = max([len('class')] + [len(n) for n in class_names])
  header = f'{"class":<{width}}  {"precision":>9}  {"recall":>9}  {"f1":>9}  {"support":>8}'
  lines = [header, '-' * len(header)]
  support = report.get('per_class_support', [0] * k)
  for i, name in enumerate(class_names):
    lines.append(
      f'{name:<{width}}  {report["per_class_precision"][i]:>9.4f}  '
      f'{report["per_class_recall"][i]:>9.4f}  {report["per_class_f1"][i]:>9.4f}  '
      f'{int(support[i]):>8d}'
    )
  lines.append('-' * len(header))
  n = report.get('num_examples', int(sum(support)))
  lines.append(f'accuracy {report["accuracy"]:.4f}  macro_f1 {report["macro_f1"]:.4f}  (n={n})')
  return '\n'.join(lines)
