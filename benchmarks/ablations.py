"""What each part of the fast CPU step buys: train-step images/s with one part switched off.

  python benchmarks/ablations.py [--rounds 2] [--rows 48x64,150x64] [--only avx2,async]

Each variant is benchmarks/train_throughput.py with one flag or environment variable changed
from the defaults, run as a fresh subprocess; runs alternate (the order rotates from row to row
and reverses every round) so drift on a shared machine cancels out. Prints a markdown table of
medians over rounds, each relative to the default in the same row, and, as its last line, one
JSON object with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_peers import run_one  # noqa: E402  (same folder)


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


# name: (what it is, extra train_throughput.py args, extra environment)
VARIANTS: dict[str, tuple[str, list[str], dict[str, str]]] = {
  'default': ('fer_jax as shipped (native kernels, inline dispatch, chunks)', [], {}),
  'avx2': (
    'C++ kernels built for AVX2 (-march=haswell) instead of this CPU',
    [],
    {'FER_JAX_NATIVE_MARCH': 'haswell'},
  ),
  'portable': (
    'C++ kernels built without SIMD intrinsics (-march=x86-64)',
    [],
    {'FER_JAX_NATIVE_MARCH': 'x86-64'},
  ),
  'dot': ("lowering='dot': im2col + XLA matmul, no C++ kernels", ['--lowering', 'dot'], {}),
  'async': ("JAX's asynchronous CPU dispatch", ['--async-dispatch'], {}),
  'no_malloc': ("glibc's default malloc settings", ['--no-malloc-tuning'], {}),
  'whole_batch': ('no gradient chunks (microbatch 0)', ['--microbatch', '0'], {}),
  'bf16': (
    'bfloat16 compute (im2col convs; the C++ kernels are float32)',
    ['--dtype', 'bfloat16'],
    {},
  ),
  'devices2': (
    '2 simulated CPU devices, one per core (jit over a 2-device mesh)',
    ['--devices', '2'],
    {},
  ),
  'plain': (
    'plain JAX: lax.conv + nn.max_pool, whole batch',
    ['--lowering', 'xla', '--microbatch', '0'],
    {},
  ),
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--rows', default='48x64,150x64', help='SIZExBATCH list')
  p.add_argument('--only', default='', help='comma-separated variants (default is always run)')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--steps-per-window', type=int, default=10)
  args = p.parse_args()
  rows = parse_rows(args.rows)
  names = ['default'] + [
    n for n in (args.only.split(',') if args.only else VARIANTS) if n and n != 'default'
  ]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f'--only: unknown variants {unknown}; known: {sorted(VARIANTS)}')

  runs: list[dict] = []
  for r in range(args.rounds):
    for i, (size, batch) in enumerate(rows):
      k = (r + i) % len(names)
      order = names[k:] + names[:k]
      for name in order if r % 2 == 0 else order[::-1]:
        _, extra, env = VARIANTS[name]
        cmd = [
          sys.executable,
          'benchmarks/train_throughput.py',
          '--size',
          str(size),
          '--batch',
          str(batch),
          '--windows',
          str(args.windows),
          '--steps-per-window',
          str(args.steps_per_window),
        ] + extra
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
          record = run_one(name, cmd)
        finally:
          for key, value in saved.items():
            if value is None:
              os.environ.pop(key, None)
            else:
              os.environ[key] = value
        record.update(round=r, size=size, batch=batch, env=env)
        runs.append(record)

  def median(name, size, batch):
    rates = [
      x['result']['images_per_s']
      for x in runs
      if x['framework'] == name and (x['size'], x['batch']) == (size, batch) and 'result' in x
    ]
    return statistics.median(rates) if rates else None

  print()
  print('| variant | ' + ' | '.join(f'{s}x{s} b{b} img/s (vs default)' for s, b in rows) + ' |')
  print('|---|' + '---|' * len(rows))
  summary = []
  for name in names:
    cells = []
    for size, batch in rows:
      rate, base = median(name, size, batch), median('default', size, batch)
      rel = rate / base if rate and base else None
      summary.append(
        {
          'variant': name,
          'size': size,
          'batch': batch,
          'images_per_s': rate,
          'relative_to_default': None if rel is None else round(rel, 3),
        }
      )
      cells.append('-' if rate is None else f'{rate:.0f} ({rel:.2f})' if rel else f'{rate:.0f}')
    print(f'| {name}: {VARIANTS[name][0]} | ' + ' | '.join(cells) + ' |')
  print(
    json.dumps(
      {
        'summary': summary,
        'rounds': args.rounds,
        'windows': args.windows,
        'steps_per_window': args.steps_per_window,
        'cpu_count': os.cpu_count(),
        'runs': runs,
      }
    )
  )


if __name__ == '__main__':
  main()
