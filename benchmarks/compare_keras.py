"""fer_jax vs the Keras peer, side by side: train-step images/s for the speed issue's rows.

  python benchmarks/compare_keras.py [--rounds 2] [--rows 48x64,48x256,150x64] [--no-plain]
runs benchmarks/train_throughput.py (with this Python) and benchmarks/peer_keras.py (with
the Keras virtualenv's Python) as fresh subprocesses, one at a time, and prints a markdown
table of the medians over rounds plus, as its last line, one JSON object with every run.
Unless --no-plain, a third column is the straightforward JAX program the speed work started
from: train_throughput.py with `--lowering xla --microbatch 0` (lax.conv + nn.max_pool on the
whole batch under one jax.jit, XLA's own gradients).

Machines drift (thermal state, neighbours), so runs alternate: the order of the runs rotates
from row to row and from round to round, so each side runs first, in the middle and last
equally often. All sides get the same size, batch, window settings and augmentation switch.
The Keras Python is --keras-python, else $FER_JAX_KERAS_PYTHON, else .venv-keras/bin/python
in the repo root, else venv-keras/bin/python next to the repo; without a Python that imports
tensorflow the table has fer_jax only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROWS = '48x64,48x256,150x64'
RUN_TIMEOUT_S = 1800


def default_keras_python() -> str:
  """$FER_JAX_KERAS_PYTHON, else the first existing candidate, else the repo-local path."""
  if env := os.environ.get('FER_JAX_KERAS_PYTHON'):
    return env
  candidates = [
    os.path.join(REPO, '.venv-keras', 'bin', 'python'),
    os.path.join(os.path.dirname(REPO), 'venv-keras', 'bin', 'python'),
  ]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def parse_rows(text: str) -> list[tuple[int, int]]:
  """'48x64,150x64' -> [(48, 64), (150, 64)]."""
  rows = []
  for item in text.split(','):
    try:
      size, batch = (int(v) for v in item.strip().lower().split('x'))
    except ValueError:
      raise SystemExit(f'--rows: {item!r} is not SIZExBATCH (e.g. 48x64)') from None
    rows.append((size, batch))
  return rows


def keras_version(python: str) -> tuple[str | None, str]:
  """(TF version, '') if `python` imports tensorflow, else (None, why not)."""
  if not os.path.exists(python):
    return None, f'{python} does not exist'
  try:
    out = subprocess.run(
      [python, '-c', 'import tensorflow as tf; print(tf.__version__)'],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    )
  except (OSError, subprocess.TimeoutExpired) as e:
    return None, f'{python}: {e}'
  if out.returncode:
    tail = (out.stderr.strip().splitlines() or ['(no output)'])[-1]
    return None, f'{python} cannot import tensorflow: {tail}'
  return out.stdout.strip().splitlines()[-1], ''


def last_json(stdout: str) -> dict | None:
  for line in reversed(stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def run_one(framework: str, cmd: list[str]) -> dict:
  """Runs one benchmark subprocess; returns its JSON (or an error) plus bookkeeping."""
  load = os.getloadavg()[0]
  print(
    f'[{time.strftime("%H:%M:%S")}] {framework}: {shlex.join(cmd)} (load {load:.2f})',
    file=sys.stderr,
    flush=True,
  )
  t = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S)
    rc, stdout, stderr = out.returncode, out.stdout, out.stderr
  except subprocess.TimeoutExpired:
    rc, stdout, stderr = -1, '', f'timed out after {RUN_TIMEOUT_S} s'
  record = {
    'framework': framework,
    'cmd': cmd,
    'rc': rc,
    'load_before': round(load, 2),
    'wall_s': round(time.perf_counter() - t, 1),
  }
  result = last_json(stdout) if rc == 0 else None
  if result is None or 'images_per_s' not in result:
    record['error'] = '\n'.join((stderr or stdout).strip().splitlines()[-5:]) or f'rc={rc}'
    print(f'  FAILED: {record["error"]}', file=sys.stderr, flush=True)
  else:
    record['result'] = result
    print(f'  {result["images_per_s"]} img/s', file=sys.stderr, flush=True)
  return record


def _median(records: list[dict]) -> float | None:
  rates = [r['result']['images_per_s'] for r in records if 'result' in r]
  return statistics.median(rates) if rates else None


def _fmt(v: float | None) -> str:
  return '-' if v is None else f'{v:.0f}'


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--rows', default=DEFAULT_ROWS, help='SIZExBATCH list')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--steps-per-window', type=int, default=10)
  p.add_argument('--no-augment', action='store_true', help='forwarded to both sides')
  p.add_argument('--jax-python', default=sys.executable)
  p.add_argument('--keras-python', default=default_keras_python())
  p.add_argument('--extra-jax-args', default='', help='e.g. "--lowering xla"')
  p.add_argument('--extra-keras-args', default='', help='e.g. "--onednn on"')
  p.add_argument(
    '--no-plain',
    action='store_true',
    help='skip the plain-JAX column (fer_jax with --lowering xla --microbatch 0)',
  )
  args = p.parse_args()
  rows = parse_rows(args.rows)

  tf_version, why = keras_version(args.keras_python)
  if tf_version is None:
    print(
      f'Keras skipped: {why}. Create the venv with: python3 -m venv .venv-keras && '
      '.venv-keras/bin/pip install tensorflow-cpu (or pass --keras-python)',
      file=sys.stderr,
    )
  common = ['--windows', str(args.windows), '--steps-per-window', str(args.steps_per_window)]
  common += ['--no-augment'] if args.no_augment else []

  def command(framework: str, size: int, batch: int) -> list[str]:
    if framework == 'keras':
      return (
        [args.keras_python, 'benchmarks/peer_keras.py', '--size', str(size), '--batch', str(batch)]
        + common
        + shlex.split(args.extra_keras_args)
      )
    plain = ['--lowering', 'xla', '--microbatch', '0'] if framework == 'plain_jax' else []
    return (
      [
        args.jax_python,
        'benchmarks/train_throughput.py',
        '--size',
        str(size),
        '--batch',
        str(batch),
      ]
      + common
      + shlex.split(args.extra_jax_args)
      + plain
    )

  frameworks = (
    ['fer_jax'] + (['keras'] if tf_version else []) + ([] if args.no_plain else ['plain_jax'])
  )
  runs: list[dict] = []
  for r in range(args.rounds):
    for i, (size, batch) in enumerate(rows):
      k = (r + i) % len(frameworks)
      order = frameworks[k:] + frameworks[:k]
      for framework in order if r % 2 == 0 else order[::-1]:
        record = run_one(framework, command(framework, size, batch))
        record.update(round=r, size=size, batch=batch)
        runs.append(record)

  print()
  columns = ([('keras', 'Keras img/s')] if tf_version else []) + [('fer_jax', 'fer_jax img/s')]
  columns += [] if args.no_plain else [('plain_jax', 'plain JAX (lax.conv + nn.max_pool) img/s')]
  ratios = [('keras', 'fer_jax / Keras')] if tf_version else []
  ratios += [] if args.no_plain else [('plain_jax', 'fer_jax / plain JAX')]
  titles = ['row (size, batch)'] + [t for _, t in columns] + [t for _, t in ratios]
  print('| ' + ' | '.join(titles) + ' |')
  print('|' + '---|' * len(titles))
  summary = []
  for size, batch in rows:
    mine = [x for x in runs if (x['size'], x['batch']) == (size, batch)]
    rate = {f: _median([x for x in mine if x['framework'] == f]) for f in frameworks}
    ratio = {
      f: (rate['fer_jax'] / rate[f] if rate['fer_jax'] and rate[f] else None) for f, _ in ratios
    }
    summary.append(
      {
        'size': size,
        'batch': batch,
        'keras_images_per_s': rate.get('keras'),
        'fer_jax_images_per_s': rate['fer_jax'],
        'plain_jax_images_per_s': rate.get('plain_jax'),
        'ratio': None if ratio.get('keras') is None else round(ratio['keras'], 3),
        'ratio_vs_plain_jax': (
          None if ratio.get('plain_jax') is None else round(ratio['plain_jax'], 3)
        ),
      }
    )
    cells = [f'{size}x{size}, b{batch}'] + [_fmt(rate[f]) for f, _ in columns]
    cells += ['-' if ratio[f] is None else f'{ratio[f]:.2f}' for f, _ in ratios]
    print('| ' + ' | '.join(cells) + ' |')
  print(
    json.dumps(
      {
        'summary': summary,
        'rounds': args.rounds,
        'augment': not args.no_augment,
        'windows': args.windows,
        'steps_per_window': args.steps_per_window,
        'keras_python': args.keras_python,
        'tf': tf_version,
        'keras_skipped': why or None,
        'cpu_count': os.cpu_count(),
        'runs': runs,
      }
    )
  )


if __name__ == '__main__':
  main()
