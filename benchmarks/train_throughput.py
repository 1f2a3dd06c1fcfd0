"""Images/s of the full fer_jax train step (augmentation included unless --no-augment).

  python benchmarks/train_throughput.py --size 48 --batch 64
prints a progress table and, as its last line, one JSON object. Defaults are the base
config's training settings. Warm-up (compilation) is excluded; the figure is the median of
several timed windows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='experiments/base.py')
  p.add_argument('--size', type=int, default=None, help='model input size (default: config)')
  p.add_argument('--batch', type=int, default=None, help='global batch (default: config)')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'))
  p.add_argument('--lowering', default=None, choices=('auto', 'xla', 'dot', 'native'))
  p.add_argument('--parallel', default=None, choices=('jit', 'pmap'))
  p.add_argument('--devices', type=int, default=0, help='simulate N CPU devices (0: as found)')
  p.add_argument('--no-augment', action='store_true')
  p.add_argument('--microbatch', type=int, default=None,
                 help='examples per gradient chunk (-1: auto, 0: whole batch; default: config)')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--steps-per-window', type=int, default=10)
  p.add_argument('--no-malloc-tuning', action='store_true',
                 help="glibc's default allocator settings (see fer_jax/runtime.py)")
  p.add_argument('--async-dispatch', action='store_true',
                 help="JAX's default asynchronous CPU dispatch (see fer_jax/runtime.py)")
  args = p.parse_args()
  from fer_jax import runtime
  if args.no_malloc_tuning:
    os.environ.setdefault('FER_JAX_MALLOC_TUNED', '0')
  elif (tuned := runtime.tuned_environ()) is not None:  # as launch.py does
    os.execve(sys.executable, [sys.executable] + sys.argv, tuned)
  if args.devices:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')

  import importlib.util
  import jax
  if not args.async_dispatch:
    runtime.inline_cpu_dispatch()  # as launch.py does
  import numpy as np
  from fer_jax import native, parallel
  from fer_jax.models import layers
  from fer_jax import checkpointing
  from fer_jax.train import compile_steps, make_step_context, sums_factory
  from fer_jax.train_step import create_train_state, make_optimizer

  spec = importlib.util.spec_from_file_location('cfg', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.size: config.model.image_size = args.size
  if args.batch: config.train.batch_size = args.batch
  if args.dtype: config.model.dtype = args.dtype
  if args.lowering: config.model.lowering = args.lowering
  if args.parallel: config.parallel = args.parallel
  if args.no_augment: config.augment.enabled = False
  if args.microbatch is not None: config.train.microbatch_size = args.microbatch

  batch_size, size = config.train.batch_size, config.model.image_size
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size)
  ctx = make_step_context(config, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25)
  tx = make_optimizer(config.train, steps_per_epoch=448)
  state = jax.jit(lambda: create_train_state(ctx, tx), out_shardings=parallel.replicated(mesh))()
  steps = compile_steps(ctx, config.parallel, mesh)
  batch_spec = {'image': jax.ShapeDtypeStruct((batch_size, 48, 48, 1), np.uint8),
                'label': jax.ShapeDtypeStruct((batch_size,), np.int32)}
  fresh_sums = sums_factory(ctx, checkpointing.abstract_like(state), batch_spec, config.parallel,
                            mesh)
  state = steps.prepare_state(state)
  rng = np.random.default_rng(0)
  # FER2013 images are 48x48; a larger model input is produced by the on-device resample.
  host = [{'image': rng.integers(0, 256, (batch_size, 48, 48, 1), dtype=np.uint8),
           'label': rng.integers(0, 7, (batch_size,)).astype(np.int32)} for _ in range(4)]

  def run(n):
    nonlocal state
    m = fresh_sums()
    for i in range(n):
      state, m = steps.train(state, steps.put_batch(host[i % len(host)]), m)
    jax.block_until_ready(m)

  run(3)  # compile + warm up
  rates = []
  for w in range(args.windows):
    t = time.perf_counter()
    run(args.steps_per_window)
    rate = args.steps_per_window * batch_size / (time.perf_counter() - t)
    rates.append(rate)
    print(f'window {w}: {rate:.0f} img/s', file=sys.stderr)
  resolved = layers.resolve_lowering(config.model.lowering)
  result = {
      'images_per_s': round(float(np.median(rates)), 1),
      'size': size, 'batch': batch_size, 'devices': jax.device_count(),
      'dtype': config.model.dtype, 'lowering': config.model.lowering,
      'lowering_resolved': resolved, 'parallel': config.parallel,
      'augment': bool(config.augment.enabled), 'model': config.model.name,
      'microbatch': ctx.microbatch,
      'windows': [round(r, 1) for r in rates], 'backend': jax.default_backend(),
      'jax': jax.__version__,
      'malloc_tuned': os.environ.get('FER_JAX_MALLOC_TUNED') == '1',
      'cpu_async_dispatch': bool(jax.config.values['jax_cpu_enable_async_dispatch']),
      'native_isa': native.isa() if resolved == 'native' else None,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
