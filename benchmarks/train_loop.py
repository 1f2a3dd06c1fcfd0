"""The full train loop's images/s against the bare train step's, and the host time per step.

  python benchmarks/train_loop.py                 # the table (1 and 8 simulated CPU devices)
  python benchmarks/train_loop.py --quick         # two small rows (a smoke test)

Each row runs in its own process (the simulated device count is fixed when JAX starts):
- `loop`: `train.train_and_evaluate` on synthetic faces for `--steps` steps: grain feeding,
  the device transfer, the step, the device-side metric sums fetched once per log window,
  the preemption check; evaluation and checkpoint every 10 minutes (so, in these short runs,
  at the end only), on 16384 synthetic faces. Its figure is `train_images_per_s` (the first log
  window, which compiles, and evaluation/save time are left out, as in results.json).
- `step`: the same compiled step in a Python loop over batches already on the device.
- host µs/step = (loop s/step - step s/step): what the loop adds per step. The goal is
  <= 100 µs + 0.2 µs per example of the global batch, with a trivial model (one Dense layer,
  no augmentation) so that the step itself costs little; and loop >= 95 % of step for the seed
  CNN at global batch 512 on 8 simulated devices.
On a CPU the "device" is the same cores as the host, so both figures move with machine load:
run it on a quiet machine, and read the host time as an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

ROWS = [  # (model, devices, global batch)
  ('trivial', 1, 32),
  ('trivial', 1, 512),
  ('trivial', 1, 4096),
  ('trivial', 8, 32),
  ('trivial', 8, 512),
  ('trivial', 8, 4096),
  ('seed_cnn', 8, 512),
]
QUICK = [('trivial', 1, 32), ('trivial', 8, 512)]


def _register_trivial() -> None:
  """A one-layer model: the step costs almost nothing, so the loop's own cost shows."""
  import flax.linen as nn
  import jax.numpy as jnp

  from fer_jax import models

  class Trivial(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)

  models.MODELS['trivial'] = lambda cfg, k: Trivial(k)


def _config(model: str, batch: int, steps: int):
  from experiments import synthetic

  c = synthetic.get_config()
  # A fixed 16384 faces (rendered once, then cached): at batch 4096 an epoch is 4 steps.
  c.data.synthetic_train = 16384
  c.data.synthetic_test = 64
  c.train.batch_size = batch
  c.train.eval_batch_size = 512
  c.train.epochs = -(-steps // (16384 // batch))
  c.train.max_steps = steps
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 0  # evaluate + checkpoint by the clock only (and at the end)
  c.train.eval_every_minutes = 10.0
  c.train.final_tta = ()
  if model == 'trivial':
    c.model.name = 'trivial'
    c.augment.enabled = False
  return c


def one_row(model: str, batch: int, steps: int) -> dict:
  """Runs in a fresh process with its simulated device count already set."""
  import jax
  import numpy as np
  from absl import logging

  from fer_jax import checkpointing, parallel, runtime, train
  from fer_jax.train_step import create_train_state, make_optimizer

  logging.set_verbosity(logging.WARNING)
  runtime.inline_cpu_dispatch()
  if model == 'trivial':
    _register_trivial()
  config = _config(model, batch, steps)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
  loop_ips = results['train_images_per_s']

  # The bare step: the same compiled step, batches already on the device.
  mesh = parallel.make_mesh()
  ctx = train.make_step_context(
    config, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25
  )
  state = jax.jit(
    lambda: create_train_state(ctx, make_optimizer(config.train, steps)),
    out_shardings=parallel.replicated(mesh),
  )()
  spec = {
    'image': jax.ShapeDtypeStruct((batch, 48, 48, 1), np.uint8),
    'label': jax.ShapeDtypeStruct((batch,), np.int32),
  }
  fresh = train.sums_factory(ctx, checkpointing.abstract_like(state), spec, 'jit', mesh)
  compiled = train.compile_steps(ctx, 'jit', mesh)
  rng = np.random.default_rng(0)
  batches = [
    compiled.put_batch(
      {
        'image': rng.integers(0, 256, (batch, 48, 48, 1), np.uint8),
        'label': rng.integers(0, 7, batch).astype(np.int32),
      }
    )
    for _ in range(4)
  ]
  sums = fresh()
  for i in range(3):
    state, sums = compiled.train(state, batches[i % 4], sums)
  jax.block_until_ready(sums)
  n = max(steps - 50, 20)
  t = time.perf_counter()
  for i in range(n):
    state, sums = compiled.train(state, batches[i % 4], sums)
  jax.block_until_ready(sums)
  step_s = (time.perf_counter() - t) / n
  loop_s = batch / loop_ips
  return {
    'model': model,
    'devices': jax.device_count(),
    'batch': batch,
    'loop_images_per_s': round(loop_ips, 1),
    'step_images_per_s': round(batch / step_s, 1),
    'loop_vs_step': round(step_s / loop_s, 3),
    'host_us_per_step': round((loop_s - step_s) * 1e6, 1),
    'host_goal_us': round(100 + 0.2 * batch, 1),
    'steps': steps,
    'run_wall_s': round(wall, 1),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=250, help='loop steps per row')
  p.add_argument('--quick', action='store_true', help='two small rows, few steps')
  p.add_argument('--row', help=argparse.SUPPRESS)  # model,devices,batch: run one row here
  args = p.parse_args()
  if args.row:
    model, _, batch = args.row.split(',')
    print(json.dumps(one_row(model, int(batch), args.steps)))
    return
  rows, steps = (QUICK, 60) if args.quick else (ROWS, args.steps)
  from fer_jax import runtime

  env = dict(os.environ, **(runtime.tuned_environ() or {}), JAX_PLATFORMS='cpu')
  print(
    f'{"model":9} {"dev":>3} {"batch":>5} {"loop img/s":>11} {"step img/s":>11} '
    f'{"loop/step":>9} {"host us":>8} {"goal us":>8}'
  )
  for model, devices, batch in rows:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    out = subprocess.run(
      [sys.executable, __file__, '--row', f'{model},{devices},{batch}', '--steps', str(steps)],
      env=env,
      capture_output=True,
      text=True,
      check=False,
    )
    if out.returncode:
      last = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith('    @')]
      print(f'{model:9} {devices:>3} {batch:>5}  failed: {(last or ["?"])[-1][:150]}', flush=True)
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
      f'{model:9} {devices:>3} {batch:>5} {r["loop_images_per_s"]:>11.0f} '
      f'{r["step_images_per_s"]:>11.0f} {r["loop_vs_step"]:>9.3f} '
      f'{r["host_us_per_step"]:>8.0f} {r["host_goal_us"]:>8.0f}',
      flush=True,
    )
    print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == '__main__':
  main()
