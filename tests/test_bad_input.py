"""Bad input: one clear line naming the file (and the CSV line), a nonzero exit, nothing written.

Every case of the corpus goes through `train.train_and_evaluate` (the CLI's path minus its
printing; it fails before anything compiles), and each category also through `launch.py`
itself: exit status 1, one `error: ...` line, no traceback unless --verbosity asks for it,
no cache entry and no checkpoint.
"""

import gzip
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import base
from fer_jax import train
from fer_jax.data.datasets import load_dataset
from fer_jax.errors import FerJaxError
from tests.conftest import REPO

HEADER = 'emotion,pixels,Usage'
PIXELS = ' '.join(['7'] * 2304)
BAD_LINE = 4  # the corpus puts its bad data row on line 4 (header, two good rows, then it)


def row(emotion='3', pixels=PIXELS, usage='Training') -> str:
  return f'{emotion},{pixels},{usage}'


def good_rows(per_split: int = 8, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  rows = []
  for usage in ('Training', 'PublicTest', 'PrivateTest'):
    for _ in range(per_split):
      pixels = ' '.join(map(str, rng.integers(0, 256, 2304)))
      rows.append(row(str(rng.integers(0, 7)), pixels, usage))
  return rows


def write(path: pathlib.Path, lines: list[str], *, newline='\n', bom=False, gz=False) -> str:
  data = (b'\xef\xbb\xbf' if bom else b'') + (newline.join(lines) + newline).encode()
  path.write_bytes(gzip.compress(data) if gz else data)
  return str(path)


def with_bad_row(tmp: pathlib.Path, bad: str) -> str:
  rows = good_rows()
  return write(tmp / 'fer.csv', [HEADER] + rows[:2] + [bad] + rows[2:])


def _truncated_gz(tmp: pathlib.Path) -> str:
  data = gzip.compress((HEADER + '\n' + '\n'.join(good_rows()) + '\n').encode())
  path = tmp / 'fer.csv.gz'
  path.write_bytes(data[: len(data) // 2])
  return str(path)


def _empty(tmp: pathlib.Path) -> str:
  (tmp / 'fer.csv').write_bytes(b'')
  return str(tmp / 'fer.csv')


def _directory(tmp: pathlib.Path) -> str:
  (tmp / 'a_dir').mkdir()
  return str(tmp / 'a_dir')


# id -> (makes the bad file in a directory and returns its path, expected text after the path)
CSV_CASES = {
  'empty_file': (_empty, ' is empty (0 bytes), expected the FER2013 CSV'),
  'header_only': (lambda t: write(t / 'fer.csv', [HEADER]), ' has a header but no data rows'),
  'wrong_column': (
    lambda t: write(t / 'fer.csv', ['emotion,pixel,Usage'] + good_rows()),
    " line 1: header is 'emotion,pixel,Usage', expected 'emotion,pixels,Usage'",
  ),
  'missing_column_header': (
    lambda t: write(t / 'fer.csv', ['emotion,pixels', f'3,{PIXELS}']),
    " line 1: header is 'emotion,pixels'",
  ),
  'missing_column_row': (
    lambda t: with_bad_row(t, f'3,{PIXELS}'),
    f' line {BAD_LINE}: 2 columns (expected 3: emotion,pixels,Usage)',
  ),
  'extra_column': (
    lambda t: with_bad_row(t, row() + ',extra'),
    f' line {BAD_LINE}: 4 columns (expected 3: emotion,pixels,Usage)',
  ),
  'pixels_2303': (
    lambda t: with_bad_row(t, row(pixels=' '.join(['7'] * 2303))),
    f' line {BAD_LINE}: pixel count 2303 (expected 2304)',
  ),
  'pixels_2305': (
    lambda t: with_bad_row(t, row(pixels=' '.join(['7'] * 2305))),
    f' line {BAD_LINE}: pixel count 2305 (expected 2304)',
  ),
  'non_integer_pixel': (
    lambda t: with_bad_row(t, row(pixels=PIXELS.replace('7', '7.5', 1))),
    f" line {BAD_LINE}: pixel 1 of 2304 is '7.5' (expected an integer 0..255)",
  ),
  'pixel_256': (
    lambda t: with_bad_row(t, row(pixels='7 256' + PIXELS[3:])),
    f" line {BAD_LINE}: pixel 2 of 2304 is '256' (expected an integer 0..255)",
  ),
  'pixel_minus_1': (
    lambda t: with_bad_row(t, row(pixels='7 7 -1' + PIXELS[5:])),
    f" line {BAD_LINE}: pixel 3 of 2304 is '-1' (expected an integer 0..255)",
  ),
  'emotion_7': (
    lambda t: with_bad_row(t, row(emotion='7')),
    f" line {BAD_LINE}: emotion '7' (expected an integer 0..6)",
  ),
  'emotion_minus_1': (
    lambda t: with_bad_row(t, row(emotion='-1')),
    f" line {BAD_LINE}: emotion '-1' (expected an integer 0..6)",
  ),
  'emotion_blank': (
    lambda t: with_bad_row(t, row(emotion='')),
    f" line {BAD_LINE}: emotion '' (expected an integer 0..6)",
  ),
  'unknown_usage': (
    lambda t: with_bad_row(t, row(usage='Validation')),
    f" line {BAD_LINE}: Usage 'Validation' (expected one of Training, PublicTest, PrivateTest)",
  ),
  'truncated_gz': (_truncated_gz, ': the gzip data is truncated'),
  'gz_not_gzip': (
    lambda t: write(t / 'fer.csv.gz', [HEADER] + good_rows()),
    " is named .gz but is not gzip data (it starts with b'em')",
  ),
  'directory': (_directory, ' is a directory, expected the FER2013 CSV file'),
  'missing_path': (lambda t: str(t / 'nowhere' / 'fer2013.csv'), ': file not found.'),
}


def tiny_config(data_path: str, tmp: pathlib.Path, source: str = 'csv'):
  c = base.get_config()
  c.data.source = source
  c.data.path = data_path
  c.data.cache_dir = str(tmp / 'cache')
  c.train.batch_size = 4
  c.train.eval_batch_size = 8
  c.train.epochs = 1
  c.train.max_steps = 1
  return c


def assert_nothing_written(tmp: pathlib.Path) -> None:
  cache = tmp / 'cache'
  assert not cache.exists() or not list(cache.iterdir()), list(cache.iterdir())
  checkpoints = tmp / 'workdir' / 'checkpoints'
  assert not checkpoints.exists() or not list(checkpoints.iterdir()), list(checkpoints.iterdir())


def in_process_error(config, tmp: pathlib.Path) -> str:
  with pytest.raises(FerJaxError) as info:
    train.train_and_evaluate(config, str(tmp / 'workdir'))
  message = str(info.value)
  assert '\n' not in message
  assert_nothing_written(tmp)
  return message


CLI_FLAGS = (
  '--config.train.batch_size=4',
  '--config.train.eval_batch_size=8',
  '--config.train.epochs=1',
  '--config.train.max_steps=1',
)


def run_cli(tmp: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    JAX_PLATFORMS='cpu',
    FER_JAX_CACHE=str(tmp / 'cache'),
  )
  return subprocess.run(
    [
      sys.executable,
      'launch.py',
      '--config',
      'experiments/base.py',
      f'--workdir={tmp / "workdir"}',
      *CLI_FLAGS,
      *flags,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )


def cli_error_line(tmp: pathlib.Path, *flags: str) -> str:
  """Runs launch.py, checks the failure contract and returns the text of its error line."""
  out = run_cli(tmp, *flags)
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-2000:]
  assert_nothing_written(tmp)
  return errors[0][len('error: ') :]


# --- CSV -----------------------------------------------------------------------------------------


@pytest.mark.parametrize('case', sorted(CSV_CASES))
def test_bad_csv_is_one_line_naming_file_and_line(tmp_path, case):
  make, expected = CSV_CASES[case]
  path = make(tmp_path)
  message = in_process_error(tiny_config(path, tmp_path), tmp_path)
  assert message.startswith(path + expected), message


@pytest.mark.parametrize('case', ['pixel_256', 'truncated_gz', 'missing_path'])
def test_bad_csv_through_the_cli(tmp_path, case):
  make, expected = CSV_CASES[case]
  path = make(tmp_path)
  message = cli_error_line(tmp_path, f'--config.data.path={path}')
  assert message.startswith(path + expected), message


def test_verbosity_shows_the_traceback(tmp_path):
  path = CSV_CASES['emotion_7'][0](tmp_path)
  out = run_cli(tmp_path, f'--config.data.path={path}', '--verbosity=1')
  assert out.returncode != 0
  assert 'Traceback' in out.stderr and f'{path} line {BAD_LINE}: emotion' in out.stderr
  assert_nothing_written(tmp_path)


@pytest.mark.parametrize('variant', ['crlf', 'bom', 'crlf_bom_gz'])
def test_crlf_and_bom_simply_work(tmp_path, variant):
  rows = [HEADER] + good_rows()
  expected = load_dataset(
    tiny_config(write(tmp_path / 'lf.csv', rows), tmp_path).data, image_size=48
  )
  path = write(
    tmp_path / ('v.csv.gz' if 'gz' in variant else 'v.csv'),
    rows,
    newline='\r\n' if 'crlf' in variant else '\n',
    bom='bom' in variant,
    gz='gz' in variant,
  )
  got = load_dataset(tiny_config(path, tmp_path).data, image_size=48)
  for name in ('Training', 'PublicTest', 'PrivateTest'):
    assert len(got[name]) == 8
    np.testing.assert_array_equal(got[name].images, expected[name].images)
    np.testing.assert_array_equal(got[name].labels, expected[name].labels)


def test_skip_bad_rows_trains_and_reports_exactly_what_was_skipped(tmp_path):
  """Through the CLI, on a CRLF file with a BOM: the run works and names each reason's count."""
  rows = good_rows()
  bad = [
    row(pixels=' '.join(['7'] * 2303)),
    row(emotion='9'),
    row(pixels='300' + PIXELS[1:]),
    row(pixels=' '.join(['7'] * 2303)),
  ]
  path = write(tmp_path / 'fer.csv', [HEADER] + rows[:3] + bad + rows[3:], newline='\r\n', bom=True)
  out = run_cli(tmp_path, f'--config.data.path={path}', '--config.data.skip_bad_rows=True')
  assert out.returncode == 0, out.stderr[-3000:]
  assert (
    f'{path}: skipped 4 of 28 data rows (skip_bad_rows=True): '
    "2 x pixel count 2303 (expected 2304); 1 x emotion '9' (expected an integer 0..6); "
    '1 x pixel value not an integer 0..255'
  ) in out.stderr
  assert "'Training': 8, 'PublicTest': 8, 'PrivateTest': 8" in out.stderr
  assert (tmp_path / 'workdir' / 'results.json').exists()


# --- Image folders -------------------------------------------------------------------------------


def _gray(path: pathlib.Path, value: int = 100, size=(48, 48)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size[::-1], value, np.uint8), mode='L').save(path)


def make_tree(root: pathlib.Path) -> pathlib.Path:
  for split in ('train', 'test'):
    _gray(root / split / 'happy' / 'a.png', 50)
    _gray(root / split / 'sad' / 'b.png', 150)
  return root


FOLDER_CASES = {
  'unknown_class_folder': (
    'train/angery/x.png',
    lambda p: _gray(p),
    ": unknown class folder 'angery'; allowed names (any case): angry, ",
  ),
  'empty_class_folder': ('train/fear', lambda p: p.mkdir(parents=True), ': class folder is empty'),
  'corrupt_image': (
    'train/happy/c.png',
    lambda p: p.write_bytes(b'\x89PNG\r\n\x1a\nnot really'),
    ': corrupt or unreadable image',
  ),
  'non_image_file': (
    'test/sad/notes.txt',
    lambda p: p.write_text('hello'),
    ': not an image file (expected .png, .jpg, .jpeg)',
  ),
}


@pytest.mark.parametrize('case', sorted(FOLDER_CASES))
def test_bad_image_folder_is_one_line_naming_the_path(tmp_path, case):
  relative, make, expected = FOLDER_CASES[case]
  root = make_tree(tmp_path / 'faces')
  bad = root / relative
  make(bad)
  named = bad.parent if case == 'unknown_class_folder' else bad
  message = in_process_error(tiny_config(str(root), tmp_path, 'folders'), tmp_path)
  assert message.startswith(f'{named}{expected}'), message


def test_bad_image_folder_through_the_cli(tmp_path):
  root = make_tree(tmp_path / 'faces')
  (root / 'train' / 'happy' / 'c.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  message = cli_error_line(tmp_path, '--config.data.source=folders', f'--config.data.path={root}')
  assert message.startswith(f'{root}/train/happy/c.png: corrupt or unreadable image'), message


def test_colour_and_odd_sized_images_work(tmp_path):
  root = make_tree(tmp_path / 'faces')
  Image.new('RGB', (60, 40), (255, 0, 0)).save(root / 'train' / 'happy' / 'colour.jpg', quality=95)
  _gray(root / 'train' / 'sad' / 'big.png', 200, size=(100, 75))
  ds = load_dataset(tiny_config(str(root), tmp_path, 'folders').data, image_size=48)
  train_split = ds['Training']
  assert train_split.images.shape == (4, 48, 48, 1) and train_split.images.dtype == np.uint8
  np.testing.assert_array_equal(train_split.labels, [3, 3, 4, 4])
  red = train_split.images[1]  # happy/colour.jpg sorts after happy/a.png
  assert np.all(np.abs(red.astype(int) - 76) <= 3)  # ITU-R 601 luma of pure red
  assert np.all(train_split.images[3] == 200)  # sad/big.png (after sad/b.png), from 100x75


# --- Config and workdir --------------------------------------------------------------------------


@pytest.mark.parametrize(
  'flag, expected',
  [
    ('--config.train.epoch=3', 'epoch'),
    ('--config.train.epochs=abc', 'abc'),
    (
      '--config.train.batch_size=30',
      'config.train.batch_size=30 is not divisible by the 4 devices (1 process(es)): use a '
      'multiple of 4',
    ),
    ('--config.train.epochs=-2', 'config.train.epochs=-2: must be positive'),
  ],
)
def test_bad_config_is_one_line(tmp_path, flag, expected):
  path = write(tmp_path / 'fer.csv', [HEADER] + good_rows())
  message = cli_error_line(tmp_path, f'--config.data.path={path}', flag)
  assert expected in message, message


def test_unwritable_workdir_fails_up_front(tmp_path):
  """A workdir that cannot be created (here: under a file) stops the run before any data."""
  (tmp_path / 'a_file').write_text('')
  path = write(tmp_path / 'fer.csv', [HEADER] + good_rows())
  out = run_cli(tmp_path, f'--config.data.path={path}', f'--workdir={tmp_path}/a_file/run')
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert (
    out.stderr.strip()
    .splitlines()[-1]
    .startswith(f'error: workdir {tmp_path}/a_file/run is not writable: ')
  ), out.stderr[-2000:]
  assert not (tmp_path / 'cache').exists() or not list((tmp_path / 'cache').iterdir())
