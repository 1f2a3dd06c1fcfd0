"""Streaming, fully validated reader for the FER2013 CSV (`emotion,pixels,Usage`).

The file is 300 MB of text (35,887 rows of 2,304 space-separated integers), so the
reader never holds it whole: a background thread reads (and un-gzips) 4 MiB blocks,
and two worker threads parse blocks of complete lines with a few vectorised numpy
passes over the raw bytes (token ends, the 3 bytes before each token end), which
release the GIL. Every row's structure is checked without a per-row Python loop;
only the lines that fail a check go through an exact per-row parser, which
tolerates harmless variations (quotes, extra whitespace, blank lines) and otherwise
names the line and the problem, so a bad file is never silently misread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import threading
import zlib
from collections.abc import Generator
from concurrent import futures

import numpy as np
from absl import logging

from fer_jax.data import cache
from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES, Dataset, Split
from fer_jax.errors import DataError

try:  # ISA-L inflates about 3x faster than zlib; optional (pip install isal).
  from isal import isal_zlib as _inflate
except ImportError:
  _inflate = zlib

IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
HEADER = ('emotion', 'pixels', 'Usage')
# Bump when parsing changes what a file yields, so older cache entries are rebuilt.
PARSER_VERSION = 1
CACHE_KIND = 'fer2013_csv'

_BLOCK_BYTES = 4 << 20  # decompressed text per block: about 500 rows
_WORKERS = 2  # blocks parsed in parallel
_IN_FLIGHT = 3  # blocks submitted but not yet collected: bounds memory
_MAX_LINE_BYTES = 1 << 20
_GZIP_MAGIC = b'\x1f\x8b'
_UTF8_BOM = b'\xef\xbb\xbf'
_PAD = 4  # non-digit bytes before each block's text: every token has a 4-byte window
_SPACE, _COMMA, _NEWLINE, _CR = 32, 44, 10, 13
_FIELD_STRIP = b' \t"'
_USAGE_IDS = {u.encode(): i for i, u in enumerate(FER2013_USAGES)}
_WHERE_FROM = (
  'FER2013 is the Kaggle "Challenges in Representation Learning: Facial Expression '
  'Recognition Challenge" download (fer2013.csv, also inside fer2013.tar.gz); pass its '
  'location with --config.data.path=...'
)


@dataclasses.dataclass(frozen=True)
class ParsedCSV:
  """The rows of a FER2013 CSV, in file order, minus any skipped rows."""

  images: np.ndarray  # uint8 (N, 48, 48)
  labels: np.ndarray  # int32 (N,), indexes FER2013_CLASSES
  usage: np.ndarray  # int8 (N,), indexes FER2013_USAGES
  skipped: dict[str, int]  # reason -> number of rows skipped for it
  rows_read: int  # data rows seen, skipped ones included


class _RowError(Exception):
  """A bad data row: `reason` is the countable kind, `detail` the specific message."""

  def __init__(self, reason: str, detail: str | None = None):
    super().__init__(detail or reason)
    self.reason = reason
    self.detail = detail or reason


# ---------------------------------------------------------------------------
# Reading: file checks, gzip detection, background block reader.


def _check_path(path: str) -> None:
  if os.path.isdir(path):
    raise DataError(
      f'{path} is a directory, expected the FER2013 CSV file (fer2013.csv or '
      'fer2013.csv.gz); for a folder of class-named image folders use '
      '--config.data.source=folders'
    )
  if not os.path.exists(path):
    raise DataError(f'{path}: file not found. {_WHERE_FROM}')
  if os.path.getsize(path) == 0:
    raise DataError(f'{path} is empty (0 bytes), expected the FER2013 CSV')


def _is_gzip(path: str) -> bool:
  """Gzip is detected by its magic bytes; a `.gz` name without them is an error."""
  with open(path, 'rb') as f:
    magic = f.read(2)
  if magic == _GZIP_MAGIC:
    return True
  if path.endswith('.gz'):
    raise DataError(
      f'{path} is named .gz but is not gzip data (it starts with {magic!r}); '
      'decompress it properly, or rename it if it is a plain CSV'
    )
  return False


def _plain_blocks(path: str) -> Generator[bytes, None, None]:
  with open(path, 'rb') as f:
    while block := f.read(_BLOCK_BYTES):
      yield block


def _gzip_blocks(path: str) -> Generator[bytes, None, None]:
  """Decompresses (possibly multi-member) gzip; truncation and corruption are errors."""
  d = _inflate.decompressobj(wbits=31)
  fed = False  # whether `d` has seen any of its member yet
  with open(path, 'rb') as f:
    while data := f.read(_BLOCK_BYTES // 4):
      while True:
        if not fed:
          data = data.lstrip(b'\0')  # zero padding between or after members
          if not data:
            break
          fed = True
        try:
          out = d.decompress(data, _BLOCK_BYTES)  # bounded: a gzip bomb cannot fill memory
        except (zlib.error, _inflate.error) as e:
          raise DataError(f'{path}: corrupt gzip data ({e}); re-download or re-compress it') from e
        if out:
          yield out
        if d.eof:
          data = d.unused_data  # the start of the next member, if any
          d, fed = _inflate.decompressobj(wbits=31), False
          continue
        data = d.unconsumed_tail
        if not data and len(out) < _BLOCK_BYTES:
          break  # all input consumed and no output pending: read more
  if fed and not d.eof:
    raise DataError(
      f'{path}: the gzip data is truncated (the file ends before the end of the '
      'compressed stream); re-download it'
    )


def _prefetch(blocks: Generator[bytes, None, None], depth: int = 2) -> Generator[bytes, None, None]:
  """Runs `blocks` in a thread (zlib and file reads release the GIL) with a small queue."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for block in blocks:
        if not put(block):
          return
      put(done)
    except BaseException as e:  # re-raised in the consumer
      put(e)
    finally:
      blocks.close()

  thread = threading.Thread(target=work, name='fer2013_csv_reader', daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


# ---------------------------------------------------------------------------
# Parsing: header, the vectorised block parser, the per-row fallback.


def _show(text: bytes, limit: int = 40) -> str:
  s = text.decode('utf-8', 'replace')
  return repr(s if len(s) <= limit else s[:limit] + '...')


def _check_header(path: str, line: bytes) -> None:
  if line.startswith(_UTF8_BOM):
    line = line[len(_UTF8_BOM) :]
  line = line.rstrip(b'\r')
  names = tuple(f.strip(_FIELD_STRIP) for f in line.split(b','))
  if names != tuple(h.encode() for h in HEADER):
    hint = ''
    if line[:1].isdigit():
      hint = '; the file seems to have no header row'
    raise DataError(
      f"{path} line 1: header is {_show(line)}, expected 'emotion,pixels,Usage'{hint}"
    )


def _parse_row(line: bytes) -> tuple[int, np.ndarray, int] | None:
  """Slow, exact parse of one data line: (label, pixels, usage), None if blank.

  Tolerates CR, surrounding whitespace and quotes around fields, and runs of
  whitespace between pixel values; raises _RowError for anything else.
  """
  line = line.rstrip(b'\r')
  if not line.strip():
    return None
  fields = line.split(b',')
  if len(fields) != 3:
    raise _RowError(
      f'{len(fields)} column{"s" if len(fields) > 1 else ""} (expected 3: emotion,pixels,Usage)'
    )
  emotion, pixels, usage = (f.strip(_FIELD_STRIP) for f in fields)
  if not (emotion.isdigit() and int(emotion) < len(FER2013_CLASSES)):
    raise _RowError(f'emotion {_show(emotion, 12)} (expected an integer 0..6)')
  tokens = pixels.split()
  if len(tokens) != NUM_PIXELS:
    raise _RowError(f'pixel count {len(tokens)} (expected {NUM_PIXELS})')
  for i, tok in enumerate(tokens):
    if not (tok.isdigit() and int(tok) <= 255):
      raise _RowError(
        'pixel value not an integer 0..255',
        f'pixel {i + 1} of {NUM_PIXELS} is {_show(tok, 12)} (expected an integer 0..255)',
      )
  values = np.array(list(map(int, tokens)), np.uint8)
  usage_id = _USAGE_IDS.get(usage)
  if usage_id is None:
    raise _RowError(f'Usage {_show(usage, 20)} (expected one of {", ".join(FER2013_USAGES)})')
  return int(emotion), values, usage_id


class _Scratch(threading.local):
  """Per-thread work buffers reused across blocks.

  Fresh multi-megabyte temporaries for every block cost page faults that can
  exceed the (cheap, in-place) arithmetic done on them.
  """

  def __init__(self):
    super().__init__()
    self.buffers: dict[str, np.ndarray] = {}

  def get(self, name: str, n: int, dtype) -> np.ndarray:
    buf = self.buffers.get(name)
    if buf is None or len(buf) < n:
      buf = self.buffers[name] = np.empty(n + n // 4, dtype)
    return buf[:n]


_scratch = _Scratch()


def _token_values(a: np.ndarray, ends: np.ndarray, tag: str, check_long: bool = False):
  """Values of the digit runs that end just before a[_PAD + ends].

  Returns (values uint16, bad, length_sum), views of `tag`'s scratch buffers:
  `bad` marks an empty token (no digit before the end) and, with `check_long`, a
  token of more than 3 digits (whose value here is wrong); `length_sum` adds up
  the token lengths capped at 3.
  """
  n = len(ends)
  get = _scratch.get
  d3 = a[_PAD - 1 :].take(ends, out=get(tag + 'd3', n, np.uint8))
  d2 = a[_PAD - 2 :].take(ends, out=get(tag + 'd2', n, np.uint8))
  d1 = a[_PAD - 3 :].take(ends, out=get(tag + 'd1', n, np.uint8))
  d3 -= 48  # digits become 0..9, anything else wraps to > 9
  d2 -= 48
  d1 -= 48
  bad = np.greater(d3, 9, out=get(tag + 'bad', n, bool))
  m2 = np.less_equal(d2, 9, out=get(tag + 'm2', n, bool))
  m1 = np.less_equal(d1, 9, out=get(tag + 'm1', n, bool))
  m1 &= m2
  if check_long:
    d0 = a[_PAD - 4 :].take(ends, out=get(tag + 'd0', n, np.uint8))
    d0 -= 48
    bad |= m1 & (d0 <= 9)
  length_sum = n + np.count_nonzero(m2) + np.count_nonzero(m1)
  d2 *= m2
  d1 *= m1
  d2 *= 10
  d2 += d3
  values = np.multiply(d1, 100, dtype=np.uint16, out=get(tag + 'values', n, np.uint16))
  values += d2
  return values, bad, length_sum


def _line_bounds(data: bytes, offset: int, end: int):
  """Each line's end (its newline) and first and last comma, relative to `offset`.

  A Python loop of find() calls: a few per line, and faster than numpy here.
  """
  ends, firsts, lasts = [], [], []
  find, rfind = data.find, data.rfind
  pos = offset
  while pos < end:
    e = find(b'\n', pos, end)
    ends.append(e)
    firsts.append(find(b',', pos, e))
    lasts.append(rfind(b',', pos, e))
    pos = e + 1
  return (
    np.array(ends, np.int64) - offset,
    np.array(firsts, np.int64) - offset,
    np.array(lasts, np.int64) - offset,
  )


def _parse_block(
  data: bytes | bytearray,
  offset: int,
  end: int,
  ends: np.ndarray,
  c1: np.ndarray,
  c2: np.ndarray,
  images: np.ndarray,
  labels: np.ndarray,
  usage: np.ndarray,
) -> list[int]:
  """Vectorised parse of the complete lines data[offset:end] into n output rows.

  `ends`, `c1`, `c2` come from _line_bounds; data[offset - _PAD:offset] must be
  non-digits. Fills images (n, 2304), labels and usage, and returns the (sorted)
  lines the fast path could not vouch for: their outputs are unset and must come
  from _parse_row. Every other line is exactly `D,P,U` with D a digit 0..6, U a
  Usage name (optionally + CR) and P 2,304 tokens of 1-3 ASCII digits, each <= 255,
  separated by single spaces.
  """
  a = np.frombuffer(data, np.uint8, count=end)[offset - _PAD :]
  body = a[_PAD:]
  n = len(ends)
  starts = np.zeros_like(ends)
  starts[1:] = ends[:-1] + 1

  # c1 (after the emotion) and c2 (before the Usage) are the first and last comma.
  bad = (c1 < 0) | (c1 == c2)
  c1 = np.where(bad, starts, c1)  # keeps the indexing below in bounds
  c2 = np.where(bad, ends, c2)
  label = body.take(starts) - np.uint8(48)
  bad |= (c1 - starts != 1) | (label >= len(FER2013_CLASSES))
  labels[:] = label
  usage[:] = -1
  usage_start = c2 + 1
  usage_len = ends - (body.take(np.maximum(ends - 1, 0)) == _CR) - usage_start
  for i, name in enumerate(FER2013_USAGES):
    rows = np.flatnonzero(usage_len == len(name))
    chars = body[usage_start[rows, None] + np.arange(len(name))]
    usage[rows[(chars == np.frombuffer(name.encode(), np.uint8)).all(axis=1)]] = i
  bad |= usage < 0

  # Pixels: 2,303 tokens end at a space, the last one at c2.
  size = len(body)
  is_space = np.equal(body, _SPACE, out=_scratch.get('is_space', size, bool))
  spaces = np.flatnonzero(is_space)
  digit = np.subtract(body, np.uint8(48), out=_scratch.get('digit', size, np.uint8))
  n_digits = np.count_nonzero(np.less_equal(digit, 9, out=_scratch.get('is_digit', size, bool)))
  counts = np.diff(np.searchsorted(spaces, ends), prepend=0)
  values, bad_token, length_sum = _token_values(a, spaces, 'space')
  last, bad_last, last_length_sum = _token_values(a, c2, 'last')
  # Good lines have no digits or spaces outside the pixel text except the emotion
  # digit; there, the tokens are exactly the digit runs, and all have <= 3 digits
  # iff the (capped) token lengths account for every digit.
  pixel_bytes = int((c2 - c1 - 1).sum())
  only_digits_spaces = n_digits + len(spaces) == pixel_bytes + n
  short_tokens = length_sum + last_length_sum == n_digits - n
  if (
    only_digits_spaces
    and short_tokens
    and not bad.any()
    and (counts == NUM_PIXELS - 1).all()
    and not bad_token.any()
    and not bad_last.any()
    and values.max(initial=0) <= 255
    and last.max(initial=0) <= 255
  ):
    images[:, :-1] = values.reshape(n, NUM_PIXELS - 1)
    images[:, -1] = last
    return []

  # Something is off: flag the lines it is in, keep the rest.
  bad |= counts != NUM_PIXELS - 1
  if not only_digits_spaces:
    pos = np.flatnonzero(~((digit <= 9) | is_space))
    line = np.searchsorted(ends, pos)
    in_pixels = (pos > c1.take(line)) & (pos < c2.take(line))
    bad[line[in_pixels]] = True
  bad_token = bad_token | (values > 255)
  bad_last = bad_last | (last > 255)
  if not short_tokens:
    bad_token |= _token_values(a, spaces, 'space_long', check_long=True)[1]
    bad_last |= _token_values(a, c2, 'last_long', check_long=True)[1]
  bad[np.searchsorted(ends, spaces[bad_token])] = True
  bad |= bad_last
  good = ~bad
  if good.any():
    token_line = np.repeat(np.arange(n), counts)
    images[good, :-1] = values[good[token_line]].reshape(-1, NUM_PIXELS - 1)
    images[good, -1] = last[good]
  return np.flatnonzero(bad).tolist()


class _BlockBuffers:
  """Reusable byte buffers for the blocks in flight.

  Each block is pad + the previous block's incomplete line + the new bytes; copying
  that into a recycled buffer avoids a fresh 4 MiB allocation per block, whose page
  faults cost more than the copy.
  """

  def __init__(self):
    self.free: list[bytearray] = []

  def fill(self, *parts: bytes) -> tuple[bytearray, int]:
    size = sum(len(p) for p in parts)
    buf = self.free.pop() if self.free else bytearray()
    if len(buf) < size:
      buf = bytearray(size + size // 8)
    pos = 0
    for p in parts:
      buf[pos : pos + len(p)] = p
      pos += len(p)
    return buf, size

  def release(self, buf: bytearray) -> None:
    self.free.append(buf)


class _Accumulator:
  """Parses blocks on a thread pool straight into growing output arrays.

  numpy releases the GIL in the passes _parse_block makes, so two blocks (and the
  reader thread's decompression) proceed in parallel. Blocks are collected in file
  order; flagged lines are resolved then, with the exact per-row parser.
  """

  def __init__(self, path: str, skip_bad_rows: bool, pool: futures.Executor, size_hint: int):
    self.path = path
    self.skip_bad_rows = skip_bad_rows
    self.pool = pool
    self.size_hint = size_hint  # expected text bytes, for the first allocation
    self.buffers = _BlockBuffers()
    self.in_flight: collections.deque = collections.deque()
    self.images = np.empty((0, NUM_PIXELS), np.uint8)
    self.labels = np.empty(0, np.int32)
    self.usage = np.empty(0, np.int8)
    self.keep = np.empty(0, bool)
    self.rows = 0  # output rows handed out (one per line submitted)
    self.skipped: dict[str, int] = {}
    self.rows_read = 0
    self.line_number = 2  # of the next line to collect; the header is line 1

  def submit(self, data: bytes | bytearray, offset: int, end: int, release: bool) -> None:
    """Queues data[offset:end] (complete lines; the _PAD bytes before are non-digits).

    With `release`, `data` goes back to self.buffers once the block is collected.
    """
    ends, c1, c2 = _line_bounds(data, offset, end)
    n = len(ends)
    if self.rows + n > len(self.labels):
      self._grow(self.rows + n, bytes_per_row=(end - offset) / n)
    rows = slice(self.rows, self.rows + n)
    self.rows += n
    self.keep[rows] = True
    future = self.pool.submit(
      _parse_block,
      data,
      offset,
      end,
      ends,
      c1,
      c2,
      self.images[rows],
      self.labels[rows],
      self.usage[rows],
    )
    self.in_flight.append((future, data, offset, ends, rows, release))
    if len(self.in_flight) > _IN_FLIGHT:
      self._collect_oldest()

  def _grow(self, need: int, bytes_per_row: float) -> None:
    self.finish()  # blocks in flight write into the current arrays
    capacity = max(
      need,
      int(len(self.labels) * 1.5),
      int(self.size_hint / bytes_per_row * 1.02) + 16 if not len(self.labels) else 0,
    )
    for name in ('images', 'labels', 'usage', 'keep'):
      old = getattr(self, name)
      new = np.empty((capacity,) + old.shape[1:], old.dtype)
      new[: self.rows] = old[: self.rows]
      setattr(self, name, new)

  def finish(self) -> None:
    while self.in_flight:
      self._collect_oldest()

  def _collect_oldest(self) -> None:
    future, data, offset, ends, rows, release = self.in_flight.popleft()
    flagged = future.result()
    n = len(ends)
    read = n - len(flagged)
    for k in flagged:
      r = rows.start + k
      line = bytes(data[offset + (ends[k - 1] + 1 if k else 0) : offset + ends[k]])
      try:
        row = _parse_row(line)
      except _RowError as e:
        if not self.skip_bad_rows:
          raise DataError(f'{self.path} line {self.line_number + k}: {e.detail}') from None
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        self.keep[r] = False
        read += 1
        continue
      if row is None:  # a blank line: not a row
        self.keep[r] = False
        continue
      self.labels[r], self.images[r], self.usage[r] = row
      read += 1
    self.rows_read += read
    self.line_number += n
    if release:
      self.buffers.release(data)

  def result(self) -> ParsedCSV:
    skipped = dict(sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    n = self.rows
    images, labels, usage, keep = self.images[:n], self.labels[:n], self.usage[:n], self.keep[:n]
    if not keep.all():
      images, labels, usage = images[keep], labels[keep], usage[keep]
    return ParsedCSV(
      images=images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE),
      labels=labels,
      usage=usage,
      skipped=skipped,
      rows_read=self.rows_read,
    )


def _skipped_summary(skipped: dict[str, int]) -> str:
  return '; '.join(f'{count} x {reason}' for reason, count in skipped.items())


def _log_skipped(path: str, skipped: dict[str, int], rows_read: int) -> None:
  logging.warning(
    '%s: skipped %d of %d data rows (skip_bad_rows=True): %s',
    path,
    sum(skipped.values()),
    rows_read,
    _skipped_summary(skipped),
  )


def parse_fer2013_csv(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> ParsedCSV:
  """Reads and validates a FER2013 CSV (plain or gzip), streaming it in blocks.

  Raises DataError (one line: file, line number, problem) for a missing, empty or
  malformed file, or, unless `skip_bad_rows`, for the first bad data row. With
  `skip_bad_rows`, bad rows are dropped, counted by reason in `skipped` and logged.
  """
  path = os.fspath(path)
  _check_path(path)
  pool = futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix='fer2013_csv_parse')
  try:
    acc = _read(path, skip_bad_rows, pool)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  if acc.rows_read == 0:
    raise DataError(f'{path} has a header but no data rows')
  result = acc.result()
  if not len(result.labels):
    raise DataError(
      f'{path}: all {acc.rows_read} data rows are bad and were skipped: '
      f'{_skipped_summary(result.skipped)}'
    )
  if result.skipped:
    _log_skipped(path, result.skipped, result.rows_read)
  return result


def _size_hint(path: str, gz: bool) -> int:
  """The text size: the file's, or for gzip its trailer's (exact below 4 GiB, one member)."""
  size = os.path.getsize(path)
  if not gz:
    return size
  with open(path, 'rb') as f:
    f.seek(max(size - 4, 0))
    hint = int.from_bytes(f.read(4), 'little')
  return min(hint, 16 * size)  # a damaged trailer must not reserve gigabytes


def _read(path: str, skip_bad_rows: bool, pool: futures.Executor) -> _Accumulator:
  """Streams the file through the header check and the block parser."""
  pad = b'\n' * _PAD
  pending = b''  # an incomplete last line, or the header while it is incomplete
  header_done = False
  try:
    gz = _is_gzip(path)
    acc = _Accumulator(path, skip_bad_rows, pool, _size_hint(path, gz))
    blocks = _gzip_blocks(path) if gz else _plain_blocks(path)
    with contextlib.closing(_prefetch(blocks)) as prefetched:
      for block in prefetched:
        data, size = acc.buffers.fill(pad, pending, block)
        offset = _PAD
        if not header_done:
          k = data.find(b'\n', offset, size)
          if k < 0:
            pending = bytes(data[offset:size])
            acc.buffers.release(data)
            if len(pending) > 1 << 16:  # no newline in 64 KiB: not a FER2013 header
              _check_header(path, pending)
            continue
          _check_header(path, bytes(data[offset:k]))
          header_done = True
          offset = k + 1
        end = data.rfind(b'\n', offset, size) + 1
        pending = bytes(data[max(end, offset) : size])
        if end > offset:
          acc.submit(data, offset, end, release=True)
        else:
          acc.buffers.release(data)
        if len(pending) > _MAX_LINE_BYTES:
          acc.finish()
          raise DataError(
            f'{path} line {acc.line_number}: longer than {_MAX_LINE_BYTES} bytes '
            '(a FER2013 row is about 8,500); not a FER2013 CSV'
          )
  except OSError as e:
    raise DataError(f'{path}: cannot read it ({e.strerror or e})') from e
  if not header_done:
    if not pending:
      raise DataError(f'{path} is empty (no text after decompression), expected the FER2013 CSV')
    _check_header(path, pending)
  elif pending:
    data = b''.join((pad, pending, b'\n'))
    acc.submit(data, _PAD, len(data), release=False)
  acc.finish()
  return acc


def load_fer2013_rows(
  path: str | os.PathLike, *, cache_dir: str | None = None, skip_bad_rows: bool = False
) -> ParsedCSV:
  """`parse_fer2013_csv(path)` through the on-disk cache: every kept row, in file order.

  The parsed arrays are cached keyed on the file's path, size and mtime, so later runs load
  in well under a second; the skipped-row counts are cached too and logged again on a
  cached load. File order is what row-for-row companions (FER+ votes) are matched against.
  """
  path = os.fspath(path)
  _check_path(path)
  fresh = []

  def build() -> tuple[dict[str, np.ndarray], dict]:
    parsed = parse_fer2013_csv(path, skip_bad_rows=skip_bad_rows)
    fresh.append(True)
    arrays = {'images': parsed.images, 'labels': parsed.labels, 'usage': parsed.usage}
    return arrays, {'skipped': parsed.skipped, 'rows_read': parsed.rows_read}

  arrays, meta = cache.cached_arrays(
    path,
    cache_dir=cache_dir or cache.default_cache_dir(),
    kind=CACHE_KIND,
    version=PARSER_VERSION,
    build=build,
  )
  skipped = {str(k): int(v) for k, v in meta['skipped'].items()}
  if skipped and not skip_bad_rows:
    # Cached by a skip_bad_rows=True load: a strict load reports the first bad row.
    parse_fer2013_csv(path)
    raise DataError(
      f'{path} has bad rows ({_skipped_summary(skipped)}); '
      'pass --config.data.skip_bad_rows=True to skip them'
    )
  if skipped and not fresh:
    _log_skipped(path, skipped, int(meta['rows_read']))
  return ParsedCSV(
    images=arrays['images'],
    labels=arrays['labels'],
    usage=arrays['usage'],
    skipped=skipped,
    rows_read=int(meta['rows_read']),
  )


def load_fer2013_csv(
  path: str | os.PathLike, *, cache_dir: str | None = None, skip_bad_rows: bool = False
) -> Dataset:
  """FER2013 as a Dataset of the 'Training', 'PublicTest', 'PrivateTest' splits (cached)."""
  parsed = load_fer2013_rows(path, cache_dir=cache_dir, skip_bad_rows=skip_bad_rows)
  images, labels, usage = parsed.images[..., None], parsed.labels, parsed.usage
  splits = {}
  if np.all(usage[1:] >= usage[:-1]):
    # The usual layout (Training, then PublicTest, then PrivateTest): views, no copies.
    bounds = np.searchsorted(usage, np.arange(len(FER2013_USAGES) + 1))
    for i, name in enumerate(FER2013_USAGES):
      rows = slice(bounds[i], bounds[i + 1])
      splits[name] = Split(images=images[rows], labels=labels[rows])
  else:
    for i, name in enumerate(FER2013_USAGES):
      mask = usage == i
      splits[name] = Split(images=images[mask], labels=labels[mask])
  return Dataset(splits=splits, class_names=FER2013_CLASSES)
