"""On-disk cache of named numpy arrays (plus a small JSON dict) derived from a source.

Parsing FER2013's 300 MB of CSV text takes seconds; loading the parsed uint8 arrays
from an uncompressed .npz takes a fraction of one. An entry is keyed on the source
(absolute path, size, mtime; for a directory also a listing of every file's name,
size and mtime), a `kind`, a `version` and optional `params`, so a changed source or
parser is a miss. Entries are written to a temporary file and renamed into place, so
a crash never leaves a half-written entry to be read later; an unreadable entry is a
miss and is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging

_KEY = '__cache_key__'
_META = '__meta__'


def default_cache_dir() -> str:
  """`$FER_JAX_CACHE`, else ~/.cache/fer_jax; created if missing."""
  path = os.environ.get('FER_JAX_CACHE') or os.path.join(
    os.path.expanduser('~'), '.cache', 'fer_jax'
  )
  os.makedirs(path, exist_ok=True)
  return path


def source_signature(source_path: str) -> dict[str, Any]:
  """What identifies the source's current contents, cheaply (no hashing of data)."""
  path = os.path.abspath(source_path)
  st = os.stat(path)
  sig: dict[str, Any] = {'path': path, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}
  if os.path.isdir(path):
    h = hashlib.sha256()
    num_files = 0
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        try:
          fst = os.stat(full)
        except OSError:  # vanished or a dangling link: still part of the listing
          fst = None
        rel = os.path.relpath(full, path)
        h.update(f'{rel}\0{fst and fst.st_size}\0{fst and fst.st_mtime_ns}\n'.encode())
        num_files += 1
    sig.update(listing=h.hexdigest(), num_files=num_files)
  return sig


def _entry_name(source: str, kind: str, params: dict, key: str) -> tuple[str, str]:
  """(file name, prefix shared by every version of this source, kind and params).

  On a write, other entries with the prefix (older contents or versions) are removed;
  entries for other params (say, another image size) are kept.
  """
  base = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(source.rstrip(os.sep)))[:60]
  what = json.dumps([source, params], sort_keys=True)
  prefix = (
    f'{re.sub(r"[^A-Za-z0-9_-]", "_", kind)}-{base}-'
    f'{hashlib.sha256(what.encode()).hexdigest()[:8]}-'
  )
  return prefix + hashlib.sha256(key.encode()).hexdigest()[:16] + '.npz', prefix


def _json_array(obj: Any) -> np.ndarray:
  return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)


def _load(path: str, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if z[_KEY].tobytes().decode() != key:
        logging.warning('cache file %s belongs to another source; rebuilding it', path)
        return None
      meta = json.loads(z[_META].tobytes())
      arrays = {name: z[name] for name in z.files if not name.startswith('__')}
  except Exception as e:  # pylint: disable=broad-except
    # Truncated, corrupt or foreign: rebuilding is always safe.
    logging.warning(
      'cache file %s is unreadable (%s: %s); rebuilding it', path, type(e).__name__, e
    )
    return None
  return arrays, meta


def _save(path: str, prefix: str, key: str, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.npz')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(
        f, **{_KEY: np.frombuffer(key.encode(), np.uint8), _META: _json_array(meta)}, **arrays
      )
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  # Entries for older contents or versions of the same source are dead weight.
  for name in os.listdir(directory):
    if name.startswith(prefix) and name.endswith('.npz') and name != os.path.basename(path):
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, name))


def cached_arrays(
  source_path: str,
  *,
  cache_dir: str,
  kind: str,
  version: int,
  build: Callable[[], tuple[dict[str, np.ndarray], dict]],
  params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
  """Returns `build()`'s (arrays, metadata), from the cache when the source is unchanged.

  Args:
    source_path: the file or directory the arrays are derived from.
    cache_dir: where entries live (created if missing).
    kind: what the arrays are (e.g. 'fer2013_csv'); part of the key and file name.
    version: bump when `build` changes what it returns for the same source.
    build: computes (arrays, metadata); array names must not start with '__' and the
      metadata must be JSON-serialisable. If it raises, nothing is written.
    params: further JSON-serialisable inputs of `build` (e.g. an image size).

  Returns:
    The arrays and the metadata (as a JSON round trip, identical on a hit and a miss).
  """
  source = os.path.abspath(source_path)
  params = dict(params or {})
  key = json.dumps(
    {'source': source_signature(source), 'kind': kind, 'version': version, 'params': params},
    sort_keys=True,
  )
  name, prefix = _entry_name(source, kind, params, key)
  path = os.path.join(cache_dir, name)
  hit = _load(path, key)
  if hit is not None:
    logging.info('loaded %s from cache %s', source, path)
    return hit

  arrays, meta = build()
  bad_names = [n for n in arrays if n.startswith('__')]
  if bad_names:
    raise ValueError(f'array names must not start with "__": {bad_names}')
  meta = json.loads(json.dumps(meta))
  if source_signature(source) != json.loads(key)['source']:
    logging.warning('%s changed while it was being read; not caching it', source)
    return arrays, meta
  try:
    os.makedirs(cache_dir, exist_ok=True)
    _save(path, prefix, key, arrays, meta)
    logging.info('cached %s in %s', source, path)
  except OSError as e:  # an unwritable cache must not stop the run
    logging.warning('could not write cache file %s (%s); continuing without it', path, e)
  return arrays, meta
