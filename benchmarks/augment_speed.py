"""Images/s of the on-device augmentation alone (`augment.preprocess_batch`), per variant.

  python benchmarks/augment_speed.py --config experiments/base.py \
    --variant flip=True --variant shift=0.1 --variant shift=0.1,whole_pixels=True

Each --variant is a comma-separated list of `augment` overrides applied to the config's own
augmentation (values are Python literals). Every variant is compiled first; their timed
windows then alternate, so a load change on a shared machine hits them alike; each figure is
the median of its windows, and the ratio is against the first variant. The last stdout line is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def parse_variant(text: str) -> dict:
  """'shift=0.1,whole_pixels=True' -> {'shift': 0.1, 'whole_pixels': True}."""
  out = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--variant {text!r}: expected key=value items, got {item!r}')
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise SystemExit(f'--variant {text!r}: {value!r} is not a Python literal') from None
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='experiments/base.py')
  p.add_argument('--variant', action='append', required=True, help='augment overrides, k=v,...')
  p.add_argument('--batch', type=int, default=None, help='default: the config training batch')
  p.add_argument('--windows', type=int, default=7)
  p.add_argument('--calls-per-window', type=int, default=20)
  args = p.parse_args()

  import importlib.util

  import jax
  import numpy as np

  from fer_jax import augment

  spec = importlib.util.spec_from_file_location('cfg', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config()
  batch = args.batch or int(base.train.batch_size)
  size = int(base.model.image_size)
  images = jax.numpy.asarray(
    np.random.default_rng(0).integers(0, 256, (batch, 48, 48, 1), np.uint8)
  )
  keys = jax.random.split(jax.random.key(0), batch)

  runs = []
  for text in args.variant:
    cfg = base.augment.copy_and_resolve_references()
    overrides = parse_variant(text)
    for key, value in overrides.items():
      if key not in cfg:
        raise SystemExit(f'--variant {text!r}: augment has no field {key!r}')
      setattr(cfg, key, value)
    augment.check_config(cfg)
    fn = jax.jit(
      lambda x, k, cfg=cfg: augment.preprocess_batch(x, k, cfg, out_size=size, train=True)
    )
    fn(images, keys).block_until_ready()  # compile
    runs.append({'variant': text, 'fn': fn, 'windows': []})
  for _ in range(args.windows):
    for run in runs:
      t0 = time.perf_counter()
      for _ in range(args.calls_per_window):
        out = run['fn'](images, keys)
      out.block_until_ready()
      run['windows'].append(batch * args.calls_per_window / (time.perf_counter() - t0))
  first = statistics.median(runs[0]['windows'])
  rows = []
  for run in runs:
    med = statistics.median(run['windows'])
    rows.append(
      {'variant': run['variant'], 'images_per_s': round(med), 'ratio': round(med / first, 3)}
    )
    print(f'{run["variant"]:<45} {med:>12,.0f} img/s  x{med / first:.2f}')
  print(json.dumps({'config': args.config, 'batch': batch, 'size': size, 'rows': rows}))


if __name__ == '__main__':
  main()
