"""FER+ labels: Microsoft's ten-annotator relabelling of FER2013 (`fer2013new.csv`).

`fer2013new.csv` has, row for row with `fer2013.csv`, the columns `Usage,Image name,` and
ten vote counts: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt,
unknown, NF (not a face). Labels follow the rule of the official FERPlus reader
(microsoft/FERPlus src/ferplus.py, `_process_data`), applied to every image:

1. Outliers: a count of exactly 1 (a single annotator) is set to 0.
2. `majority`: the image is kept when one emotion holds MORE than half of the remaining
   votes, unknown and NF included in the total; that emotion is the label. Ties therefore
   never pass, and an image whose majority is unknown or NF is dropped.
3. `probability`: the image is kept when some emotion has strictly more remaining votes than
   unknown and than NF; the target is the remaining emotion votes normalised over the K
   classes (the FER+ paper's crossentropy mode). Only the training split uses it.
   PublicTest (FER+ validation) and PrivateTest (FER+ test) always keep the majority rule's
   images and labels, which is how the literature reports FER+ accuracy.

Eight classes (neutral ... contempt, FER+'s order) by default. Seven classes drop
contempt's votes before the rule and reorder the rest into FER2013's classes and order
(angry, disgust, fear, happy, sad, surprise, neutral). The 173 rows without an image name
are all NF=10 and fail both rules. (The official reader additionally drops images whose
label is fear or contempt, through `idx < emotion_count - 2` on 10 columns with 8 classes;
that slip is not reproduced.)
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np
from absl import logging

from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES, Dataset, Split
from fer_jax.errors import DataError

FILE_NAME = 'fer2013new.csv'
VOTE_COLUMNS: tuple[str, ...] = (
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
HEADER: tuple[str, ...] = ('Usage', 'Image name', *VOTE_COLUMNS)
FERPLUS_CLASSES: tuple[str, ...] = VOTE_COLUMNS[:8]
LABEL_MODES = ('majority', 'probability')
NUM_CLASSES = (8, 7)
# Seven classes: the FER+ vote columns of FER2013's classes, in FER2013's order.
_SEVEN_CLASS_COLUMNS = tuple(
  VOTE_COLUMNS.index(n)
  for n in ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')
)
_UNKNOWN_NF_COLUMNS = (8, 9)
_USAGE_IDS = {u.encode(): i for i, u in enumerate(FER2013_USAGES)}
_MAX_DIGITS = 3
_FIELD_STRIP = b' \t"'
WHERE_FROM = (
  'fer2013new.csv holds the FER+ votes, row for row with fer2013.csv (github.com/microsoft/FERPlus)'
)


@dataclasses.dataclass(frozen=True)
class FerPlusVotes:
  """The data rows of fer2013new.csv, in file order."""

  votes: np.ndarray  # int32 (N, 10), columns VOTE_COLUMNS
  usage: np.ndarray  # int8 (N,), indexes FER2013_USAGES
  lines: np.ndarray  # int32 (N,), each row's 1-based line number, for error messages


@dataclasses.dataclass(frozen=True)
class FerPlusLabels:
  """Both rules' verdicts for every image (see the module docstring)."""

  class_names: tuple[str, ...]
  majority_ok: np.ndarray  # bool (N,)
  probability_ok: np.ndarray  # bool (N,)
  labels: np.ndarray  # int32 (N,): the most-voted emotion (the first one on a tie)
  soft_labels: np.ndarray  # float32 (N, K): normalised emotion votes; 0 where not kept


# ---------------------------------------------------------------------------
# Parsing.


def _show(text: bytes, limit: int = 30) -> str:
  s = text.decode('utf-8', 'replace')
  return repr(s if len(s) <= limit else s[:limit] + '...')


def _read_text(path: str) -> bytes:
  if os.path.isdir(path):
    raise DataError(f'{path} is a directory, expected the FER+ vote file {FILE_NAME}')
  if not os.path.exists(path):
    raise DataError(f'{path}: file not found. {WHERE_FROM}')
  try:
    with open(path, 'rb') as f:
      data = f.read()
    if data[:2] == b'\x1f\x8b':
      data = gzip.decompress(data)
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: cannot read it ({getattr(e, "strerror", None) or e})') from e
  if not data.strip():
    raise DataError(f'{path} is empty, expected the FER+ votes ({FILE_NAME})')
  return data.removeprefix(b'\xef\xbb\xbf')


def _check_header(path: str, line: bytes) -> None:
  names = tuple(f.strip(_FIELD_STRIP) for f in line.rstrip(b'\r').split(b','))
  if names != tuple(h.encode() for h in HEADER):
    raise DataError(
      f'{path} line 1: header is {_show(line.rstrip(), 60)}, expected '
      f'{",".join(HEADER)!r} (the FER+ {FILE_NAME})'
    )


def _parse_row(line: bytes) -> tuple[int, list[int]] | None:
  """Exact parse of one data line: (usage, votes), None if blank; ValueError if bad.

  Tolerates CR, whitespace and quotes around fields.
  """
  line = line.rstrip(b'\r')
  if not line.strip():
    return None
  fields = [f.strip(_FIELD_STRIP) for f in line.split(b',')]
  if len(fields) != len(HEADER):
    raise ValueError(
      f'{len(fields)} columns (expected {len(HEADER)}: Usage, Image name and 10 vote counts)'
    )
  usage = _USAGE_IDS.get(fields[0])
  if usage is None:
    raise ValueError(f'Usage {_show(fields[0])} (expected one of {", ".join(FER2013_USAGES)})')
  for name, value in zip(VOTE_COLUMNS, fields[2:]):
    if not (value.isdigit() and len(value) <= _MAX_DIGITS):
      raise ValueError(f'{name} votes {_show(value)} (expected a count 0..999)')
  return usage, [int(v) for v in fields[2:]]


def parse_ferplus_csv(path: str | os.PathLike) -> FerPlusVotes:
  """Reads and validates fer2013new.csv (plain or gzip).

  Raises DataError (one line: file, line number, problem) for a missing, empty or
  malformed file.
  """
  path = os.fspath(path)
  data = _read_text(path)
  header_end = data.find(b'\n')
  _check_header(path, data if header_end < 0 else data[:header_end])
  body = b'' if header_end < 0 else data[header_end + 1 :]
  # One exact pass per row: 0.23 s for the 35,887 rows, once per run.
  usage_list, vote_list, line_list = [], [], []
  for number, line in enumerate(body.split(b'\n'), start=2):
    try:
      row = _parse_row(line)
    except ValueError as e:
      raise DataError(f'{path} line {number}: {e}') from None
    if row is not None:
      usage_list.append(row[0])
      vote_list.append(row[1])
      line_list.append(number)
  usage = np.array(usage_list, np.int8)
  votes = np.array(vote_list, np.int32).reshape(-1, len(VOTE_COLUMNS))
  lines = np.array(line_list, np.int32)
  if not len(usage):
    raise DataError(f'{path} has a header but no data rows')
  return FerPlusVotes(votes=votes, usage=usage, lines=lines)


def check_rows_match(
  ferplus: FerPlusVotes, ferplus_path: str, fer2013_usage: np.ndarray, fer2013_path: str
) -> None:
  """The FER+ rows must be FER2013's, row for row: same count, same Usage in every row."""
  n, m = len(ferplus.usage), len(fer2013_usage)
  if n != m:
    raise DataError(
      f'{ferplus_path} has {n} data rows but {fer2013_path} has {m}; FER+ votes '
      'are matched to the images row for row, so the two files must correspond'
    )
  bad = np.flatnonzero(ferplus.usage != fer2013_usage)
  if len(bad):
    i = bad[0]
    raise DataError(
      f'{ferplus_path} line {ferplus.lines[i]}: Usage {FER2013_USAGES[ferplus.usage[i]]} but '
      f'data row {i + 1} of {fer2013_path} is {FER2013_USAGES[fer2013_usage[i]]}; the files '
      'must correspond row for row'
    )


# ---------------------------------------------------------------------------
# The label rule.


def ferplus_labels(votes: np.ndarray, num_classes: int = 8) -> FerPlusLabels:
  """Applies the FER+ rule (module docstring) to (N, 10) vote counts."""
  if num_classes not in NUM_CLASSES:
    raise ValueError(f'num_classes={num_classes}: expected one of {NUM_CLASSES}')
  votes = np.asarray(votes)
  if votes.ndim != 2 or votes.shape[1] != len(VOTE_COLUMNS):
    raise ValueError(f'votes must be (N, {len(VOTE_COLUMNS)}), got {votes.shape}')
  v = np.where(votes <= 1, 0, votes).astype(np.int64)  # single votes are outliers
  if num_classes == 8:
    emotions, names = v[:, :8], FERPLUS_CLASSES
  else:
    emotions, names = v[:, _SEVEN_CLASS_COLUMNS], FER2013_CLASSES  # contempt's votes dropped
  other = v[:, _UNKNOWN_NF_COLUMNS]
  total = emotions.sum(axis=1) + other.sum(axis=1)
  top = emotions.max(axis=1)
  majority_ok = 2 * top > total
  probability_ok = top > other.max(axis=1)
  counts = emotions.sum(axis=1, keepdims=True)
  soft = np.where(probability_ok[:, None], emotions / np.maximum(counts, 1), 0.0)
  return FerPlusLabels(
    class_names=names,
    majority_ok=majority_ok,
    probability_ok=probability_ok,
    labels=emotions.argmax(axis=1).astype(np.int32),
    soft_labels=soft.astype(np.float32),
  )


def ferplus_dataset(
  images: np.ndarray,
  usage: np.ndarray,
  votes: np.ndarray,
  *,
  mode: str,
  num_classes: int = 8,
  train_split: str = 'Training',
) -> Dataset:
  """The FER+ Dataset of images (N, H, W, 1) with FER2013 usage codes and FER+ votes.

  Splits keep FER2013's names; each holds the images its rule keeps, in file order. In
  'probability' mode `train_split` carries soft labels (and their argmax as labels).
  """
  if mode not in LABEL_MODES:
    raise ValueError(f'mode={mode!r}: expected one of {LABEL_MODES}')
  if images.ndim != 4 or not len(images) == len(usage) == len(votes):
    raise ValueError(
      f'images {images.shape}, usage {usage.shape} and votes {votes.shape} '
      'must be (N, H, W, 1), (N,) and (N, 10)'
    )
  lab = ferplus_labels(votes, num_classes)
  splits = {}
  for i, name in enumerate(FER2013_USAGES):
    soft = mode == 'probability' and name == train_split
    keep = np.flatnonzero((usage == i) & (lab.probability_ok if soft else lab.majority_ok))
    splits[name] = Split(
      images=images[keep],
      labels=lab.labels[keep],
      soft_labels=lab.soft_labels[keep] if soft else None,
    )
    logging.info(
      'FER+ %s (%d classes, %s labels): %d of %d images kept',
      name,
      num_classes,
      'probability' if soft else 'majority',
      len(keep),
      int(np.sum(usage == i)),
    )
  return Dataset(splits=splits, class_names=lab.class_names)


def load_ferplus_csv(
  fer2013_path: str | os.PathLike,
  ferplus_path: str | os.PathLike,
  *,
  mode: str,
  num_classes: int = 8,
  train_split: str = 'Training',
  cache_dir: str | None = None,
  skip_bad_rows: bool = False,
) -> Dataset:
  """FER2013's images (through the cache) with FER+ labels from fer2013new.csv."""
  from fer_jax.data.fer2013_csv import load_fer2013_rows

  fer2013_path, ferplus_path = os.fspath(fer2013_path), os.fspath(ferplus_path)
  rows = load_fer2013_rows(fer2013_path, cache_dir=cache_dir, skip_bad_rows=skip_bad_rows)
  votes = parse_ferplus_csv(ferplus_path)
  if rows.skipped:
    raise DataError(
      f'{fer2013_path}: {sum(rows.skipped.values())} bad rows were skipped, so its '
      f'rows no longer line up with {ferplus_path}; FER+ needs every row'
    )
  check_rows_match(votes, ferplus_path, rows.usage, fer2013_path)
  return ferplus_dataset(
    rows.images[..., None],
    rows.usage,
    votes.votes,
    mode=mode,
    num_classes=num_classes,
    train_split=train_split,
  )
