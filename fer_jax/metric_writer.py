"""Scalars to TensorBoard (tensorboardX: no TensorFlow) and to `metrics.jsonl`, process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class MetricWriter:
  """Writes one JSON object per record to `workdir/metrics.jsonl` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, record: dict[str, Any], prefix: str) -> None:
    """`record` may hold scalars and lists; scalars also go to TensorBoard as prefix/name."""
    if not self._enabled:
      return
    clean = {k: _jsonable(v) for k, v in record.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': prefix, **clean}) + '\n')
    self._jsonl.flush()
    for k, v in clean.items():
      if isinstance(v, (int, float)) and k != 'epoch':
        self._tb.add_scalar(f'{prefix}/{k}', v, step)

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def _jsonable(v: Any) -> Any:
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v
