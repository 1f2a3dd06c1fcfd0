"""Scalars to TensorBoard (tensorboardX: no TensorFlow) and to `metrics.jsonl`, process 0 only.

A local workdir is written in place. An object-store workdir (gs://) cannot be appended to, and
tensorboardX writes local event files only (its own GCS writer needs TensorFlow-style gfile),
so both are written into a local staging directory and uploaded whole, at most every
`upload_every_s` seconds and at `close()`: `metrics.jsonl` (downloaded first, so a resumed run
appends) and this run's event file under `tensorboard/`. A run killed between uploads loses at
most that many seconds of records; the checkpoints do not depend on them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from fer_jax import paths


class MetricWriter:
  """Writes one JSON object per record to `workdir/metrics.jsonl` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, upload_every_s: float = 60.0):
    self._enabled = enabled
    self._tb = None
    self._jsonl = None
    self._remote = paths.resolve(workdir) if paths.is_remote(workdir) else None
    self._stage = None
    self._upload_every_s = upload_every_s
    self._uploaded_at = time.time()
    if not enabled:
      return
    from tensorboardX import SummaryWriter, summary

    self._summary = summary

    local = workdir
    if self._remote is not None:
      self._stage = tempfile.mkdtemp(prefix='fer_jax_metrics_')
      local = self._stage
      remote_jsonl = self._remote / 'metrics.jsonl'
      if remote_jsonl.exists():
        with open(os.path.join(local, 'metrics.jsonl'), 'wb') as f:
          f.write(remote_jsonl.read_bytes())
    self._tb = SummaryWriter(os.path.join(local, 'tensorboard'))
    self._jsonl = open(os.path.join(local, 'metrics.jsonl'), 'a')

  def write(self, step: int, record: dict[str, Any], prefix: str) -> None:
    """`record` may hold scalars and lists; scalars also go to TensorBoard as prefix/name."""
    if not self._enabled:
      return
    clean = {k: _jsonable(v) for k, v in record.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': prefix, **clean}) + '\n')
    self._jsonl.flush()
    # All of the record's scalars in one TensorBoard event: tensorboardX sends each event through
    # a multiprocessing queue, so one add_scalar per value multiplied that cost (benchmarks/README).
    values = [
      self._summary.scalar(f'{prefix}/{k}', v).value[0]
      for k, v in clean.items()
      if isinstance(v, (int, float)) and k != 'epoch'
    ]
    if values:
      self._tb.file_writer.add_summary(self._summary.Summary(value=values), step)
    if self._remote is not None and time.time() - self._uploaded_at >= self._upload_every_s:
      self.upload()

  def upload(self) -> None:
    """Copies the staged files to the object store (a no-op for a local workdir)."""
    if not self._enabled or self._remote is None:
      return
    self._tb.flush()
    self._copy_stage()

  def _copy_stage(self) -> None:
    for root, _, files in os.walk(self._stage):
      for name in files:
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._stage)
        target = self._remote.joinpath(*rel.split(os.sep))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local, 'rb') as f:
          target.write_bytes(f.read())
    self._uploaded_at = time.time()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()
      if self._remote is not None:
        self._copy_stage()
        shutil.rmtree(self._stage, ignore_errors=True)
      self._enabled = False


def _jsonable(v: Any) -> Any:
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v
