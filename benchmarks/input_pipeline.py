"""Is the input side fast enough? CSV parse, cached load and loader images/s vs the train step.

  python benchmarks/input_pipeline.py [--csv ../shared/data/fer2013.csv.gz]
measures (a) a cold parse of the FER2013 CSV (the cache bypassed), (b) a load through the
on-disk cache once it is built, (c) images/s of the grain training iterator alone and
(d) its ratio to the train step's images/s (benchmarks/train_throughput.py --size 48
--batch 64 in a subprocess, or --train-images-per-s). The loader should outrun the step by
at least 10x so it never shows in a training run. Progress goes to stderr; the last stdout
line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  """Median and all wall times (s) of `repeats` calls of fn()."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def loader_rate(split, batch: int, num_batches: int, warmup: int = 10) -> float:
  """Images/s of pipeline.make_train_iterator alone (shuffle, batch, gather on the host)."""
  from fer_jax.data import pipeline

  per_epoch = pipeline.steps_per_epoch(len(split), batch)
  epochs = (warmup + num_batches) // per_epoch + 1
  it = pipeline.make_train_iterator(split, global_batch=batch, num_epochs=epochs, seed=0)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
  elapsed = time.perf_counter() - t
  assert b['image'].shape == (batch, *split.images.shape[1:]), b['image'].shape
  return num_batches * batch / elapsed


def train_rate(args: argparse.Namespace) -> tuple[float, dict | None]:
  """The train step's images/s: given, or measured by train_throughput.py in a subprocess."""
  if args.train_images_per_s:
    return args.train_images_per_s, None
  cmd = [
    sys.executable,
    os.path.join(REPO, 'benchmarks', 'train_throughput.py'),
    '--size',
    '48',
    '--batch',
    '64',
  ] + shlex.split(args.train_args)
  _log(f'(d) train step: {shlex.join(cmd)}')
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    raise SystemExit(f'train_throughput.py failed (rc={out.returncode}):\n{out.stderr[-2000:]}')
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return float(result['images_per_s']), result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--csv',
    default=os.path.join(REPO, '..', 'shared', 'data', 'fer2013.csv.gz'),
    help='FER2013 CSV (.csv or .csv.gz); synthetic faces are generated if absent',
  )
  p.add_argument('--repeats', type=int, default=3, help='timed parses and cached loads')
  p.add_argument('--batches', type=int, default=3000, help='loader batches timed per batch size')
  p.add_argument('--loader-batch', default='64,256', help='loader batch sizes')
  p.add_argument(
    '--train-images-per-s',
    type=float,
    default=0.0,
    help='skip the train-step subprocess and compare with this figure',
  )
  p.add_argument('--train-args', default='', help='extra args for train_throughput.py')
  args = p.parse_args()
  if args.repeats < 1 or args.batches < 1:
    raise SystemExit('--repeats and --batches must be >= 1')

  from fer_jax.data import cache, fer2013_csv

  csv, synthetic = os.path.abspath(args.csv), False
  if not os.path.exists(csv):
    from fer_jax.data import synthetic as synth

    _log(
      f'{csv} not found: using synthetic FER2013-layout faces (6000 train / 1000 per test '
      f'split) cached in {cache.default_cache_dir()}; figures are for that smaller file'
    )
    csv = synth.ensure_synthetic_csv(
      cache.default_cache_dir(), num_train=6000, num_test=1000, seed=0
    )
    synthetic = True

  _log(f'(a) cold parse of {csv} (no cache), {args.repeats}x ...')
  parse_s, parse_all = timed(lambda: fer2013_csv.parse_fer2013_csv(csv), args.repeats)

  with tempfile.TemporaryDirectory(prefix='fer_jax_bench_cache_') as cache_dir:
    _log('(b) cached load: building the cache entry, then timing cached loads ...')
    t = time.perf_counter()
    fer2013_csv.load_fer2013_csv(csv, cache_dir=cache_dir)
    build_s = time.perf_counter() - t
    cached_s, cached_all = timed(
      lambda: fer2013_csv.load_fer2013_csv(csv, cache_dir=cache_dir), args.repeats
    )
    ds = fer2013_csv.load_fer2013_csv(csv, cache_dir=cache_dir)
  rows = sum(len(s) for s in ds.splits.values())
  train = ds['Training']

  loader = {}
  for batch in (int(b) for b in args.loader_batch.split(',')):
    _log(f'(c) loader, batch {batch}, {args.batches} batches ...')
    loader[batch] = loader_rate(train, batch, args.batches)

  step_rate, step_result = train_rate(args)
  ref = loader.get(64) or next(iter(loader.values()))
  ratio = ref / step_rate
  _log('')
  _log(f'rows: {rows:,} ({"synthetic" if synthetic else csv})')
  _log(
    f'(a) cold CSV parse        {parse_s:8.3f} s  (median of {args.repeats}; '
    f'{rows / parse_s:,.0f} rows/s)'
  )
  _log(f'(b) first load + cache    {build_s:8.3f} s')
  _log(f'    cached load           {cached_s:8.3f} s  (median of {args.repeats})')
  for batch, rate in loader.items():
    _log(f'(c) loader batch {batch:<4}     {rate:10,.0f} img/s')
  _log(f'(d) train step 48x64      {step_rate:10,.0f} img/s')
  _log(
    f'    loader/train          {ratio:10.1f}x  '
    f'({"OK: >= 10x" if ratio >= 10 else "TOO SLOW: < 10x"})'
  )
  print(
    json.dumps(
      {
        'csv': csv,
        'synthetic': synthetic,
        'rows': rows,
        'train_rows': len(train),
        'parse_s': round(parse_s, 4),
        'parse_s_all': [round(v, 4) for v in parse_all],
        'cache_build_s': round(build_s, 4),
        'cached_load_s': round(cached_s, 4),
        'cached_load_s_all': [round(v, 4) for v in cached_all],
        'loader_images_per_s': {str(b): round(r, 1) for b, r in loader.items()},
        'loader_batches': args.batches,
        'train_images_per_s': step_rate,
        'train_result': step_result,
        'loader_over_train': round(ratio, 2),
        'loader_at_least_10x': ratio >= 10,
      }
    )
  )


if __name__ == '__main__':
  main()
