"""FER2013 CSV reader: exact parsing, every validation error with its line number, skipping."""

import gzip
import logging
import os
import time
import tracemalloc

import numpy as np
import pytest

from fer_jax.data import fer2013_csv
from fer_jax.data.fer2013_csv import load_fer2013_csv, parse_fer2013_csv
from fer_jax.data.types import FER2013_CLASSES, FER2013_USAGES
from fer_jax.errors import DataError

HEADER = 'emotion,pixels,Usage'


def make_rows(n: int, seed: int = 0):
  """Random rows: labels, (n, 2304) pixels (all of 0..255 occur) and usage names."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, n)
  pixels = rng.integers(0, 256, (n, 2304))
  pixels[0, :256] = np.arange(256)  # every value, every token width
  usage = [FER2013_USAGES[i] for i in rng.integers(0, 3, n)]
  return labels, pixels, usage


def row_text(label, pixels, usage) -> str:
  return f'{label},{" ".join(map(str, pixels))},{usage}'


def write_csv(
  path, lines, *, header=HEADER, newline='\n', bom=False, gz=False, final_newline=True
) -> str:
  text = newline.join(([header] if header is not None else []) + list(lines))
  if final_newline:
    text += newline
  data = (b'\xef\xbb\xbf' if bom else b'') + text.encode()
  if gz:
    data = gzip.compress(data)
  path = str(path)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def good_lines(n: int, seed: int = 0) -> list[str]:
  labels, pixels, usage = make_rows(n, seed)
  return [row_text(*r) for r in zip(labels, pixels, usage)]


def check_parsed(parsed, n, seed=0):
  labels, pixels, usage = make_rows(n, seed)
  assert parsed.images.dtype == np.uint8 and parsed.images.shape == (n, 48, 48)
  np.testing.assert_array_equal(parsed.images.reshape(n, -1), pixels)
  assert parsed.labels.dtype == np.int32
  np.testing.assert_array_equal(parsed.labels, labels)
  assert parsed.usage.dtype == np.int8
  np.testing.assert_array_equal(parsed.usage, [FER2013_USAGES.index(u) for u in usage])
  assert parsed.rows_read == n and parsed.skipped == {}


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of ~3 rows, so rows span blocks and many blocks are in flight."""
  monkeypatch.setattr(fer2013_csv, '_BLOCK_BYTES', 20_000)


# --- Correct parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize('gz', [False, True])
def test_parses_values_labels_and_usage(tmp_path, gz):
  path = write_csv(tmp_path / ('f.csv.gz' if gz else 'f.csv'), good_lines(20), gz=gz)
  check_parsed(parse_fer2013_csv(path), 20)


def test_gzip_and_plain_identical_across_block_boundaries(tmp_path, small_blocks):
  lines = good_lines(40, seed=3)
  plain = parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines))
  packed = parse_fer2013_csv(write_csv(tmp_path / 'f.csv.gz', lines, gz=True))
  check_parsed(plain, 40, seed=3)
  for field in ('images', 'labels', 'usage'):
    np.testing.assert_array_equal(getattr(plain, field), getattr(packed, field))


def test_gzip_detected_by_magic_not_name(tmp_path):
  path = write_csv(tmp_path / 'named_plain.csv', good_lines(5), gz=True)
  check_parsed(parse_fer2013_csv(path), 5)


def test_multi_member_gzip(tmp_path, small_blocks):
  # The size in the trailer is the last member's: the output arrays must grow.
  lines = good_lines(24)
  first = (HEADER + '\n' + '\n'.join(lines[:21]) + '\n').encode()
  second = ('\n'.join(lines[21:]) + '\n').encode()
  path = tmp_path / 'multi.csv.gz'
  path.write_bytes(gzip.compress(first) + gzip.compress(second) + b'\0' * 10)
  check_parsed(parse_fer2013_csv(str(path)), 24)


@pytest.mark.parametrize('variant', ['crlf', 'bom', 'bom_crlf', 'no_final_newline', 'blank_lines'])
def test_tolerated_file_variants(tmp_path, small_blocks, variant):
  lines = good_lines(12, seed=1)
  kwargs = {}
  if 'crlf' in variant:
    kwargs['newline'] = '\r\n'
  if 'bom' in variant:
    kwargs['bom'] = True
  if variant == 'no_final_newline':
    kwargs['final_newline'] = False
  if variant == 'blank_lines':
    lines = lines[:4] + [''] + lines[4:8] + ['   ', ''] + lines[8:]
  path = write_csv(tmp_path / 'f.csv', lines, **kwargs)
  check_parsed(parse_fer2013_csv(path), 12, seed=1)


def test_tolerated_field_variants(tmp_path):
  """Quotes/whitespace around fields and extra whitespace between pixels parse the same."""
  labels, pixels, usage = make_rows(6, seed=2)
  p = [' '.join(map(str, px)) for px in pixels]
  lines = [
    f'{labels[0]},"{p[0]}",{usage[0]}',
    f'"{labels[1]}", {p[1]} ,"{usage[1]}"',
    f'{labels[2]},{p[2].replace(" ", "  ")},{usage[2]}',
    f'{labels[3]},{p[3].replace(" ", chr(9))},{usage[3]}',
    f'{labels[4]},{" ".join(f"{v:03d}" for v in pixels[4])},{usage[4]}',  # leading zeros
    f'{labels[5]},{p[5]},{usage[5]}',
  ]
  check_parsed(parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines)), 6, seed=2)


def test_four_digit_tokens_with_leading_zeros(tmp_path):
  labels, pixels, usage = make_rows(2)
  toks = [str(v) for v in pixels[1]]
  toks[7] = '0' + toks[7].rjust(3, '0')  # e.g. '0042' == 42
  lines = [row_text(labels[0], pixels[0], usage[0]), f'{labels[1]},{" ".join(toks)},{usage[1]}']
  check_parsed(parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines)), 2)


# --- Bad rows: DataError naming the file and the line -------------------------------------------


def _with_pixels(line: str, edit) -> str:
  label, pixels, usage = line.split(',')
  toks = pixels.split(' ')
  edit(toks)
  return ','.join([label, ' '.join(toks), usage])


def _set_pixel(i, value):
  def edit(toks):
    toks[i] = value

  return edit


BAD_ROWS = {
  'pixel_count_2303': (
    lambda l: _with_pixels(l, lambda t: t.pop()),
    'pixel count 2303 (expected 2304)',
  ),
  'pixel_count_2305': (
    lambda l: _with_pixels(l, lambda t: t.append('7')),
    'pixel count 2305 (expected 2304)',
  ),
  'pixel_256': (lambda l: _with_pixels(l, _set_pixel(10, '256')), "pixel 11 of 2304 is '256'"),
  'pixel_999': (lambda l: _with_pixels(l, _set_pixel(0, '999')), "pixel 1 of 2304 is '999'"),
  'pixel_last_300': (
    lambda l: _with_pixels(l, _set_pixel(2303, '300')),
    "pixel 2304 of 2304 is '300'",
  ),
  'pixel_last_long': (
    lambda l: _with_pixels(l, _set_pixel(2303, '1255')),
    "pixel 2304 of 2304 is '1255'",
  ),
  'pixel_1000': (lambda l: _with_pixels(l, _set_pixel(5, '1000')), "pixel 6 of 2304 is '1000'"),
  'pixel_negative': (
    lambda l: _with_pixels(l, _set_pixel(2303, '-1')),
    "pixel 2304 of 2304 is '-1'",
  ),
  'pixel_float': (lambda l: _with_pixels(l, _set_pixel(3, '1.5')), "pixel 4 of 2304 is '1.5'"),
  'pixel_word': (lambda l: _with_pixels(l, _set_pixel(100, 'abc')), "pixel 101 of 2304 is 'abc'"),
  'pixels_empty': (lambda l: '3,,Training', 'pixel count 0 (expected 2304)'),
  # A value replaced by nothing: the row still has 2,303 spaces.
  'pixel_empty_inside': (
    lambda l: _with_pixels(l, _set_pixel(5, '')),
    'pixel count 2303 (expected 2304)',
  ),
  'pixel_empty_first': (
    lambda l: _with_pixels(l, _set_pixel(0, '')),
    'pixel count 2303 (expected 2304)',
  ),
  'pixel_empty_last': (
    lambda l: _with_pixels(l, _set_pixel(2303, '')),
    'pixel count 2303 (expected 2304)',
  ),
  # An empty value after a '1' and a 5-digit one: the row's digit and space counts match
  # 2,304 values of <= 3 digits, and the empty value's 3-byte window reads as <= 255.
  'pixel_empty_and_long': (
    lambda l: _with_pixels(
      l, lambda t: t.__setitem__(slice(3, 10), ['00042'] + t[4:8] + ['1', ''])
    ),
    'pixel count 2303 (expected 2304)',
  ),
  'emotion_7': (lambda l: '7' + l[1:], "emotion '7' (expected an integer 0..6)"),
  'emotion_negative': (lambda l: '-1' + l[1:], "emotion '-1'"),
  'emotion_blank': (lambda l: l[1:], "emotion ''"),
  'emotion_word': (lambda l: 'x' + l[1:], "emotion 'x'"),
  'emotion_two_digits': (lambda l: '1' + l, "emotion '1"),
  'emotion_float': (lambda l: l[0] + '.0' + l[1:], "emotion '"),
  'usage_unknown': (lambda l: l.rsplit(',', 1)[0] + ',Validation', "Usage 'Validation'"),
  'usage_blank': (lambda l: l.rsplit(',', 1)[0] + ',', "Usage ''"),
  'usage_case': (lambda l: l.rsplit(',', 1)[0] + ',training', "Usage 'training'"),
  'missing_column': (lambda l: l.rsplit(',', 1)[0], '2 columns (expected 3'),
  'extra_column': (lambda l: l + ',extra', '4 columns (expected 3'),
  'one_column': (lambda l: 'garbage', '1 column (expected 3'),
}


@pytest.mark.parametrize(
  'row,gz',
  [(0, False), (15, False), (29, False), (15, True)],
  ids=['first', 'middle', 'last', 'middle_gz'],
)
@pytest.mark.parametrize('case', sorted(BAD_ROWS))
def test_bad_row_reports_file_and_line(tmp_path, small_blocks, case, row, gz):
  lines = good_lines(30)
  mutate, expected = BAD_ROWS[case]
  lines[row] = mutate(lines[row])
  name = 'fer.csv.gz' if gz else 'fer.csv'
  path = write_csv(tmp_path / name, lines, gz=gz, final_newline=row != 29)
  with pytest.raises(DataError) as e:
    parse_fer2013_csv(path)
  message = str(e.value)
  assert message.startswith(f'{path} line {row + 2}: '), message
  assert expected in message
  assert '\n' not in message


def test_line_numbers_count_blank_lines(tmp_path):
  lines = good_lines(5)
  lines[3] = '7' + lines[3][1:]
  lines = lines[:2] + ['', ''] + lines[2:]  # the bad row is now on line 1 + 6
  with pytest.raises(DataError, match=r'line 7: emotion'):
    parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines))


def test_reports_first_bad_line(tmp_path, small_blocks):
  lines = good_lines(20)
  lines[4] = BAD_ROWS['pixel_256'][0](lines[4])
  lines[12] = BAD_ROWS['emotion_7'][0](lines[12])
  with pytest.raises(DataError, match=r'line 6: pixel 11'):
    parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines))


def test_skip_bad_rows_counts_exactly(tmp_path, small_blocks, caplog):
  lines = good_lines(25)
  bad = {
    1: 'pixel_count_2303',
    7: 'pixel_count_2303',
    8: 'emotion_7',
    13: 'pixel_word',
    20: 'pixel_256',
    24: 'extra_column',
  }
  for i, case in bad.items():
    lines[i] = BAD_ROWS[case][0](lines[i])
  path = write_csv(tmp_path / 'f.csv', lines)
  with caplog.at_level(logging.WARNING):
    parsed = parse_fer2013_csv(path, skip_bad_rows=True)
  assert parsed.skipped == {
    'pixel count 2303 (expected 2304)': 2,
    "emotion '7' (expected an integer 0..6)": 1,
    'pixel value not an integer 0..255': 2,
    '4 columns (expected 3: emotion,pixels,Usage)': 1,
  }
  assert parsed.rows_read == 25
  keep = [i for i in range(25) if i not in bad]
  labels, pixels, usage = make_rows(25)
  np.testing.assert_array_equal(parsed.images.reshape(len(keep), -1), pixels[keep])
  np.testing.assert_array_equal(parsed.labels, labels[keep])
  assert 'skipped 6 of 25 data rows' in caplog.text
  assert '2 x pixel count 2303 (expected 2304)' in caplog.text


def test_skip_bad_rows_all_bad_is_an_error(tmp_path):
  lines = ['7' + l[1:] for l in good_lines(3)]
  with pytest.raises(DataError, match='all 3 data rows are bad'):
    parse_fer2013_csv(write_csv(tmp_path / 'f.csv', lines), skip_bad_rows=True)


# --- File-level problems (raise even with skip_bad_rows) ----------------------------------------


@pytest.mark.parametrize('skip', [False, True])
def test_missing_file_says_where_fer2013_comes_from(tmp_path, skip):
  path = str(tmp_path / 'nope' / 'fer2013.csv')
  with pytest.raises(DataError) as e:
    parse_fer2013_csv(path, skip_bad_rows=skip)
  message = str(e.value)
  assert path in message and 'not found' in message
  assert 'Kaggle' in message and 'Facial Expression Recognition Challenge' in message
  assert '--config.data.path=' in message


def test_directory(tmp_path):
  with pytest.raises(DataError, match='is a directory'):
    parse_fer2013_csv(str(tmp_path))


@pytest.mark.parametrize('skip', [False, True])
def test_empty_file(tmp_path, skip):
  path = tmp_path / 'f.csv'
  path.write_bytes(b'')
  with pytest.raises(DataError, match=r'f\.csv is empty'):
    parse_fer2013_csv(str(path), skip_bad_rows=skip)


def test_empty_gzip(tmp_path):
  path = tmp_path / 'f.csv.gz'
  path.write_bytes(gzip.compress(b''))
  with pytest.raises(DataError, match='is empty'):
    parse_fer2013_csv(str(path))


@pytest.mark.parametrize('final_newline', [True, False])
def test_header_only(tmp_path, final_newline):
  path = write_csv(tmp_path / 'f.csv', [], final_newline=final_newline)
  with pytest.raises(DataError, match='has a header but no data rows'):
    parse_fer2013_csv(path, skip_bad_rows=True)


@pytest.mark.parametrize(
  'header',
  [
    'emotion,pixels',
    'emotion,pixels,Usage,extra',
    'Emotion,Pixels,Usage',
    'emotion, Usage, pixels',
    '',
  ],
)
def test_wrong_header(tmp_path, header):
  path = write_csv(tmp_path / 'f.csv', good_lines(2), header=header)
  expected = r"f\.csv line 1: header is .*expected 'emotion,pixels,Usage'"
  with pytest.raises(DataError, match=expected):
    parse_fer2013_csv(path, skip_bad_rows=True)


def test_missing_header_hints(tmp_path):
  path = write_csv(tmp_path / 'f.csv', good_lines(2), header=None)
  with pytest.raises(DataError, match='seems to have no header row'):
    parse_fer2013_csv(path)


def test_binary_garbage(tmp_path):
  path = tmp_path / 'f.csv'
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
  with pytest.raises(DataError, match='line 1: header is'):
    parse_fer2013_csv(str(path))


@pytest.mark.parametrize('skip', [False, True])
def test_truncated_gzip(tmp_path, skip):
  good = write_csv(tmp_path / 'f.csv.gz', good_lines(30), gz=True)
  data = open(good, 'rb').read()
  path = tmp_path / 'cut.csv.gz'
  path.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(DataError, match='gzip data is truncated'):
    parse_fer2013_csv(str(path), skip_bad_rows=skip)


def test_corrupt_gzip(tmp_path):
  good = write_csv(tmp_path / 'f.csv.gz', good_lines(10), gz=True)
  data = bytearray(open(good, 'rb').read())
  data[-6] ^= 0xFF  # in the CRC/length trailer
  path = tmp_path / 'bad.csv.gz'
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match='corrupt gzip data'):
    parse_fer2013_csv(str(path))


def test_gz_name_without_gzip_data(tmp_path):
  path = write_csv(tmp_path / 'f.csv.gz', good_lines(2))  # plain text named .gz
  with pytest.raises(DataError, match='named .gz but is not gzip data'):
    parse_fer2013_csv(path)


def test_gzip_bomb_is_bounded(tmp_path):
  """A tiny .gz of one 200 MB line fails on the line length, without inflating it all."""
  path = tmp_path / 'bomb.csv.gz'
  path.write_bytes(gzip.compress(HEADER.encode() + b'\n' + b'7' * 200_000_000, compresslevel=1))
  tracemalloc.start()
  try:
    with pytest.raises(DataError, match='line 2: longer than'):
      parse_fer2013_csv(str(path))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 80_000_000


def test_overlong_line(tmp_path, small_blocks):
  path = write_csv(tmp_path / 'f.csv', good_lines(2) + ['1,' + '7 ' * 600_000 + ',Training'])
  with pytest.raises(DataError, match='line 4: longer than'):
    parse_fer2013_csv(path)


# --- load_fer2013_csv: Dataset, cache, skipped-row reporting -------------------------------------


@pytest.mark.parametrize('sort_by_usage', [False, True], ids=['mixed', 'sorted'])
def test_load_dataset_and_cache(tmp_path, sort_by_usage):
  labels, pixels, usage = make_rows(30)
  order = list(range(30))
  if sort_by_usage:  # FER2013's own layout: the splits are views, not copies
    order.sort(key=lambda r: FER2013_USAGES.index(usage[r]))
  path = write_csv(tmp_path / 'f.csv', [row_text(labels[r], pixels[r], usage[r]) for r in order])
  cache_dir = str(tmp_path / 'cache')
  ds = load_fer2013_csv(path, cache_dir=cache_dir)
  assert ds.class_names == FER2013_CLASSES
  assert list(ds.splits) == list(FER2013_USAGES)
  for name in FER2013_USAGES:
    rows = [r for r in order if usage[r] == name]
    split = ds[name]
    assert split.images.shape == (len(rows), 48, 48, 1) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images.reshape(len(rows), -1), pixels[rows])
    np.testing.assert_array_equal(split.labels, labels[rows])
  assert len(os.listdir(cache_dir)) == 1
  again = load_fer2013_csv(path, cache_dir=cache_dir)
  for name in FER2013_USAGES:
    np.testing.assert_array_equal(again[name].images, ds[name].images)
    np.testing.assert_array_equal(again[name].labels, ds[name].labels)


def test_cached_load_reports_skipped_rows_again(tmp_path, caplog):
  lines = good_lines(10)
  lines[4] = BAD_ROWS['pixel_count_2303'][0](lines[4])
  path = write_csv(tmp_path / 'f.csv', lines)
  cache_dir = str(tmp_path / 'cache')
  for _ in range(2):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      ds = load_fer2013_csv(path, cache_dir=cache_dir, skip_bad_rows=True)
    assert sum(len(s) for s in ds.splits.values()) == 9
    assert caplog.text.count('skipped 1 of 10 data rows') == 1
    assert '1 x pixel count 2303 (expected 2304)' in caplog.text
  # A strict load must not be served the skipped version from the cache.
  with pytest.raises(DataError, match='line 6: pixel count 2303'):
    load_fer2013_csv(path, cache_dir=cache_dir, skip_bad_rows=False)


def test_load_missing_file(tmp_path):
  with pytest.raises(DataError, match='Kaggle'):
    load_fer2013_csv(str(tmp_path / 'fer2013.csv'), cache_dir=str(tmp_path / 'cache'))


# --- The real file --------------------------------------------------------------------------------


def test_real_fer2013(fer2013_path):
  tracemalloc.start()
  try:
    start = time.perf_counter()
    parsed = parse_fer2013_csv(str(fer2013_path))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  print(
    f'parsed {fer2013_path} ({parsed.rows_read} rows) in {elapsed:.2f} s, '
    f'peak memory {peak / 1e6:.0f} MB'
  )
  # Streamed: the peak stays below the 301 MB of text, output (83 MB) included.
  assert peak < 300_000_000
  assert parsed.rows_read == 35887 and parsed.skipped == {}
  np.testing.assert_array_equal(np.bincount(parsed.usage), [28709, 3589, 3589])
  np.testing.assert_array_equal(
    np.bincount(parsed.labels), [4953, 547, 5121, 8989, 6077, 4002, 6198]
  )
  assert parsed.images.shape == (35887, 48, 48)
  # The first row of FER2013 starts 70 80 82 72 and is Angry/Training.
  np.testing.assert_array_equal(parsed.images[0, 0, :4], [70, 80, 82, 72])
  assert parsed.labels[0] == 0 and parsed.usage[0] == 0
