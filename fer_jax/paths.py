"""Workdir paths through `etils.epath` (the path library orbax uses): local or object store.

A workdir may be a local/NFS directory or a `gs://bucket/dir` (any fsspec scheme epath knows:
gs needs the `gcs` extra, gcsfs). Everything written into it goes through these helpers, so a
`gs://` workdir is never silently a local `./gs:/...` directory. Object stores have no
append and no rename: JSON files are written whole (one object write is atomic), and
append-only logs are staged locally and uploaded (`metric_writer`).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from typing import Any

from etils import epath

from fer_jax.errors import FerJaxError


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (a URI such as gs://bucket/dir), not a local path."""
  return '://' in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """An epath.Path: local paths made absolute, URIs kept as they are."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a whole file atomically: tmp + rename locally, one object write on a store."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = os.fspath(path) + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, os.fspath(path))


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
  write_text(path, json.dumps(obj, **dump_kwargs))


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(resolve(path).read_text())


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
  """matplotlib's savefig to any epath (it writes local files only)."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format=path.suffix.lstrip('.') or 'png', **savefig_kwargs)
  path.write_bytes(buf.getvalue())


def check_writable(workdir: str | os.PathLike) -> None:
  """Fails up front, not mid-epoch, when checkpoints could not be written."""
  path = resolve(workdir)
  probe = path / f'.write_test_{secrets.token_hex(6)}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; object-store clients raise their own types (auth, missing bucket).
    reason = getattr(e, 'strerror', None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise FerJaxError(f'workdir {workdir} is not writable: {reason[:300]}') from None


def check_shared(workdir: str | os.PathLike) -> None:
  """With several processes: stops all of them unless every one sees process 0's workdir.

  A checkpoint is written by all processes together into one directory, so a workdir that is
  a local directory on each host gives every host its own checkpoints and a resume that hangs
  in mismatched collectives. Process 0 writes a random token; every process reads it back.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return
  token_value = multihost_utils.broadcast_one_to_all(
    np.frombuffer(secrets.token_bytes(8), np.uint32)
  )
  token = ''.join(f'{int(v):08x}' for v in np.asarray(token_value))
  probe = resolve(workdir) / f'.shared_check_{token}'
  if jax.process_index() == 0:
    probe.write_text(token)
  multihost_utils.sync_global_devices('fer_jax_shared_workdir_written')
  try:
    seen = probe.read_text() == token
  except Exception:  # pylint: disable=broad-except
    seen = False
  everyone = np.asarray(multihost_utils.process_allgather(np.asarray([seen]))).reshape(-1)
  if jax.process_index() == 0:
    try:
      probe.unlink()
    except Exception:  # pylint: disable=broad-except
      pass
  missing = [i for i, ok in enumerate(everyone) if not ok]
  if missing:
    raise FerJaxError(
      f'workdir {workdir} is not shared: process(es) {", ".join(map(str, missing))} cannot read '
      'the token process 0 wrote there; give every process the same directory (a shared '
      'filesystem mounted at the same path, or gs://bucket/dir)'
    )
