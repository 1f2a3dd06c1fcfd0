"""Images/s of one model's forward + backward alone (no augmentation, no optimizer), per lowering.

  python benchmarks/forward_backward.py --config experiments/cpu_budget.py --lowering native xla
prints one JSON line per lowering: the median of --calls timed calls after compilation of
`jax.grad` of the cross-entropy through `model.apply` (BatchNorm statistics mutable, dropout on).
Every lowering is compiled first, then the calls alternate between them (one call of each in
turn), so a load change on a shared machine hits them alike. 'native_no_bn' is 'native' with
every BatchNorm replaced by the identity (what BatchNorm costs). `--forward-only` times the
evaluation forward pass instead (`train=False`, BatchNorm's running averages), as evaluate and
predict run it; `--dense` overrides the model's hidden Dense widths ('' for none).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='experiments/cpu_budget.py')
  p.add_argument(
    '--lowering',
    nargs='+',
    default=['native', 'xla'],
    choices=('auto', 'xla', 'dot', 'native', 'native_no_bn'),
  )
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--width', type=float, default=None, help='override config.model.width')
  p.add_argument('--calls', type=int, default=6)
  p.add_argument('--forward-only', action='store_true', help='time the evaluation forward pass')
  p.add_argument('--dense', default=None, help="override config.model.dense: '4096,4096', ''")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import optax

  from fer_jax import models, runtime

  runtime.inline_cpu_dispatch()  # as launch.py does
  spec = importlib.util.spec_from_file_location('cfg', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model_cfg = module.get_config().model
  if args.width is not None:
    model_cfg.width = type(model_cfg.width)(args.width)
  if args.dense is not None:
    model_cfg.dense = tuple(int(v) for v in args.dense.split(',') if v)
  size, b = model_cfg.image_size, args.batch
  x = jax.random.normal(jax.random.key(1), (b, size, size, 1))
  y = jnp.zeros((b,), jnp.int32)
  import flax.linen as nn

  batch_norm = nn.BatchNorm

  class NoBatchNorm(nn.Module):
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: object = None
    axis_name: object = None
    scale_init: object = None

    def __call__(self, x):
      return x

  fns = {}
  for lowering in args.lowering:
    nn.BatchNorm = NoBatchNorm if lowering == 'native_no_bn' else batch_norm
    model_cfg.lowering = 'native' if lowering.startswith('native') else lowering
    model = models.get_model(model_cfg, 7)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    others = {k: v for k, v in variables.items() if k != 'params'}
    extra = {'example_ids': jnp.arange(b)}

    @jax.jit
    def grads(params, x):
      def loss(p):
        out = model.apply(
          {'params': p, **others},
          x,
          train=True,
          mutable=list(others),
          rngs={'dropout': jax.random.key(0)},
          **extra,
        )
        logits = out[0] if isinstance(out, tuple) else out
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      if args.forward_only:
        return model.apply({'params': params, **others}, x, train=False)
      return jax.grad(loss)(params)

    jax.block_until_ready(grads(variables['params'], x))  # compiles, with this lowering's patch
    fns[lowering] = (grads, variables['params'], [])
  nn.BatchNorm = batch_norm
  for _ in range(args.calls):
    for lowering, (grads, params, times) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(grads(params, x))
      times.append(time.perf_counter() - t)
  for lowering, (_, _, times) in fns.items():
    rates = [round(b / t, 1) for t in times]
    print(
      json.dumps(
        {
          'model': model_cfg.name,
          'width': model_cfg.get('width'),
          'size': size,
          'batch': b,
          'lowering': lowering,
          'pass': 'forward' if args.forward_only else 'forward_backward',
          'dense': list(model_cfg.get('dense', ())),
          'images_per_s': round(b / sorted(times)[len(times) // 2], 1),
          'calls': rates,
          'backend': jax.default_backend(),
          'jax': jax.__version__,
        }
      )
    )


if __name__ == '__main__':
  main()
