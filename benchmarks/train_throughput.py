"""Images/s of the full fer_jax train step (augmentation included unless --no-augment).

  python benchmarks/train_throughput.py --size 48 --batch 64
  python benchmarks/train_throughput.py --model resnet18 vgg_fer_compact --lowering native xla
  python benchmarks/train_throughput.py --model vgg_fer_compact \
    --variant --variant 'model.blocks=(16,32,128,256)' 'model.width=1.0' 'model.dense=(96,)'
prints a progress table and one JSON object per (model, variant, lowering), the last line being
the last one. Defaults are the config's training settings (`--model NAME` picks a zoo model's
config, see MODEL_CONFIGS; otherwise --config); each `--variant` sets config keys as launch.py's
`--config.KEY=VALUE` would (an empty one: the config as is). Warm-up (compilation) is excluded;
every run is compiled first and their timed windows then alternate, so a load change on a shared
machine hits them alike; each figure is the median of its windows.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

# The zoo's models and the experiment config each is benchmarked with.
MODEL_CONFIGS = {
  'seed_cnn': 'experiments/base.py',
  'vgg_fer': 'experiments/vgg_fer2013.py',
  'resnet18': 'experiments/resnet18_fer2013.py',
  'vgg_fer_compact': 'experiments/cpu_budget.py',  # width 0.375, one Dense-96
}


# --augment crop_flip: what the Keras / PyTorch peers (compare_peers.py) also do.
CROP_FLIP_OFF = dict(
  rotation_deg=0.0,
  zoom=0.0,
  shift=0.0,
  shear_deg=0.0,
  brightness=0.0,
  contrast=0.0,
  erase_prob=0.0,
  mixup_alpha=0.0,
  cutmix_alpha=0.0,
)


def load_config(
  path: str,
  *,
  size: int | None = None,
  batch: int | None = None,
  dtype: str | None = None,
  parallel: str | None = None,
  augment: str = 'config',
  microbatch: int | None = None,
  width: float | None = None,
):
  """The experiment config at `path` with the benchmark's overrides.

  augment: 'config' (the experiment's own), 'crop_flip' (its random crop, if it crops, without
  scale jitter, and a horizontal flip; nothing else) or 'none'.
  """
  import importlib.util

  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if size:
    config.model.image_size = size
  if batch:
    config.train.batch_size = batch
  if dtype:
    config.model.dtype = dtype
  if parallel:
    config.parallel = parallel
  if augment == 'none':
    config.augment.enabled = False
  elif augment == 'crop_flip':
    config.augment.update(CROP_FLIP_OFF)
    config.augment.flip = True
    config.augment.crop_scale = (1.0, 1.0)
  elif augment != 'config':
    raise ValueError(f'augment={augment!r}: expected config, crop_flip or none')
  if microbatch is not None:
    config.train.microbatch_size = microbatch
  if width is not None and 'width' in config.model:  # seed_cnn has no width
    config.model.width = type(config.model.width)(width)
  return config


def apply_variant(config, settings: list[str]) -> None:
  """Sets each `KEY=VALUE` of `settings` in `config` (KEY dotted, VALUE a Python literal or a
  bare string), as `--config.KEY=VALUE` would on the command line of launch.py."""
  for setting in settings:
    key, sep, text = setting.partition('=')
    if not sep or not key:
      raise SystemExit(f'--variant {setting!r}: expected KEY=VALUE, e.g. model.width=0.5')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, 'get') else None
    if not hasattr(node, 'get') or leaf not in node:
      raise SystemExit(f'--variant {setting!r}: the config has no {key}')
    try:
      node[leaf] = value
    except TypeError as e:  # ml_collections keeps each field's type
      raise SystemExit(f'--variant {setting!r}: {e}') from None


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='experiments/base.py')
  p.add_argument(
    '--model',
    nargs='+',
    choices=sorted(MODEL_CONFIGS),
    default=None,
    help='zoo models to time, each with its experiment config (overrides --config)',
  )
  p.add_argument(
    '--width',
    type=float,
    default=None,
    help='override config.model.width (vgg_fer: a multiplier; resnet18: channels)',
  )
  p.add_argument(
    '--variant',
    nargs='*',
    action='append',
    default=None,
    metavar='KEY=VALUE',
    help='one variant of each config per --variant (its KEY=VALUE settings; none: the config '
    "as is), timed in alternation, e.g. --variant --variant 'model.blocks=(16,32,128,256)'",
  )
  p.add_argument('--size', type=int, default=None, help='model input size (default: config)')
  p.add_argument('--batch', type=int, default=None, help='global batch (default: config)')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'))
  p.add_argument(
    '--lowering',
    nargs='+',
    default=None,
    choices=('auto', 'xla', 'dot', 'native'),
    help="one or more lowerings, timed in alternation (default: the config's)",
  )
  p.add_argument('--parallel', default=None, choices=('jit', 'pmap'))
  p.add_argument('--devices', type=int, default=0, help='simulate N CPU devices (0: as found)')
  p.add_argument('--no-augment', action='store_true')
  p.add_argument(
    '--augment',
    default='config',
    choices=('config', 'crop_flip'),
    help="the config's augmentation, or its random crop + flip only (as the peers)",
  )
  p.add_argument(
    '--microbatch',
    type=int,
    default=None,
    help='examples per gradient chunk (-1: auto, 0: whole batch; default: config)',
  )
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--warmup-steps', type=int, default=3, help='untimed steps first (compilation)')
  p.add_argument('--steps-per-window', type=int, default=10)
  p.add_argument(
    '--no-malloc-tuning',
    action='store_true',
    help="glibc's default allocator settings (see fer_jax/runtime.py)",
  )
  p.add_argument(
    '--async-dispatch',
    action='store_true',
    help="JAX's default asynchronous CPU dispatch (see fer_jax/runtime.py)",
  )
  args = p.parse_args()
  from fer_jax import runtime

  if args.no_malloc_tuning:
    os.environ.setdefault('FER_JAX_MALLOC_TUNED', '0')
  elif (tuned := runtime.tuned_environ()) is not None:  # as launch.py does
    os.execve(sys.executable, [sys.executable] + sys.argv, tuned)
  if args.devices:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={args.devices}'
    )

  import jax

  if not args.async_dispatch:
    runtime.inline_cpu_dispatch()  # as launch.py does
  import numpy as np

  from fer_jax import checkpointing, models, native, parallel
  from fer_jax.models import layers
  from fer_jax.train import compile_steps, make_step_context, sums_factory
  from fer_jax.train_step import create_train_state, make_optimizer

  paths = [(m, MODEL_CONFIGS[m]) for m in args.model] if args.model else [(None, args.config)]
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  runs = []
  for (label, path), variant, lowering in itertools.product(
    paths, args.variant or [[]], args.lowering or [None]
  ):
    config = load_config(
      path,
      size=args.size,
      batch=args.batch,
      dtype=args.dtype,
      parallel=args.parallel,
      augment='none' if args.no_augment else args.augment,
      microbatch=args.microbatch,
      width=args.width,
    )
    apply_variant(config, variant)
    if lowering:
      config.model.lowering = lowering
    batch_size = config.train.batch_size
    parallel.check_batch_size(batch_size)
    ctx = make_step_context(
      config, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25
    )
    tx = make_optimizer(config.train, steps_per_epoch=448)
    state = jax.jit(lambda: create_train_state(ctx, tx), out_shardings=parallel.replicated(mesh))()
    steps = compile_steps(ctx, config.parallel, mesh)
    # FER2013 images are 48x48; a larger model input is produced by the on-device resample.
    host = [
      {
        'image': rng.integers(0, 256, (batch_size, 48, 48, 1), dtype=np.uint8),
        'label': rng.integers(0, 7, (batch_size,)).astype(np.int32),
      }
      for _ in range(4)
    ]
    batch_spec = {
      'image': jax.ShapeDtypeStruct((batch_size, 48, 48, 1), np.uint8),
      'label': jax.ShapeDtypeStruct((batch_size,), np.int32),
    }
    fresh_sums = sums_factory(
      ctx, checkpointing.abstract_like(state), batch_spec, config.parallel, mesh
    )
    runs.append(
      {
        'zoo_name': label or config.model.name,
        'label': ' '.join([label or config.model.name, *variant]),
        'variant': variant,
        'config': config,
        'ctx': ctx,
        'steps': steps,
        'state': steps.prepare_state(state),
        'host': host,
        'fresh_sums': fresh_sums,
        'rates': [],
      }
    )

  def run(r, n):
    state, steps = r['state'], r['steps']
    m = r['fresh_sums']()
    for i in range(n):
      state, m = steps.train(state, steps.put_batch(r['host'][i % len(r['host'])]), m)
    jax.block_until_ready(m)
    r['state'] = state

  for r in runs:
    run(r, max(1, args.warmup_steps))  # compile + warm up
  for w in range(args.windows):
    for r in runs:  # alternate: each window of each run under the same load
      batch_size = r['config'].train.batch_size
      t = time.perf_counter()
      run(r, args.steps_per_window)
      rate = args.steps_per_window * batch_size / (time.perf_counter() - t)
      r['rates'].append(rate)
      print(
        f'window {w} {r["label"]} {r["config"].model.lowering}: {rate:.0f} img/s', file=sys.stderr
      )
  for r in runs:
    config, rates = r['config'], r['rates']
    resolved = layers.resolve_lowering(config.model.lowering)
    result = {
      'images_per_s': round(float(np.median(rates)), 1),
      'size': config.model.image_size,
      'batch': config.train.batch_size,
      'devices': jax.device_count(),
      'dtype': config.model.dtype,
      'lowering': config.model.lowering,
      'lowering_resolved': resolved,
      'parallel': config.parallel,
      'augment': bool(config.augment.enabled),
      'augment_mode': 'none' if args.no_augment else args.augment,
      'model': config.model.name,
      'zoo_name': r['zoo_name'],
      'variant': r['variant'],
      'params': models.count_params(r['state'].params),
      'width': config.model.get('width'),
      'microbatch': r['ctx'].microbatch,
      'windows': [round(x, 1) for x in rates],
      'backend': jax.default_backend(),
      'jax': jax.__version__,
      'malloc_tuned': os.environ.get('FER_JAX_MALLOC_TUNED') == '1',
      'cpu_async_dispatch': bool(jax.config.values['jax_cpu_enable_async_dispatch']),
      'native_isa': native.isa() if resolved == 'native' else None,
    }
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
