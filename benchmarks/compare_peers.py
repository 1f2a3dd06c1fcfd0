"""fer_jax against its Keras and PyTorch peers, side by side: the fast-CPU issue's table.

  python benchmarks/compare_peers.py                      # every zoo model, batches 64 and 256
  python benchmarks/compare_peers.py --models seed_cnn resnet18:32 --batches 64
runs benchmarks/train_throughput.py (this Python), benchmarks/peer_keras.py (the Keras
virtualenv's Python) and benchmarks/peer_torch.py (the PyTorch virtualenv's Python; eager, and
`torch.compile` with `--frameworks ... torch_compile`) as fresh subprocesses, one at a time,
and prints a markdown table of the medians over rounds plus, as its last line, one JSON
object with every run.

Each peer gets the network and the recipe of fer_jax's model as flags derived here, at run
time, from the model fer_jax builds for the experiment config (train_throughput.MODEL_CONFIGS):
conv channels and dense widths read off its parameters, optimizer, learning rate, weight
decay, label smoothing, EMA and standardization off the config; the peer asserts that its
trainable-parameter count equals fer_jax's. `NAME:W` sets config.model.width (resnet18:32 is
the 32-channel ResNet-18). Augmentation is the same on all sides: each config's random crop
(40 px of the 48-px faces for vgg_fer and ResNet, 44 px for the compact VGG, none for the
seed CNN) and a random horizontal flip, nothing else (fer_jax runs with `--augment
crop_flip`); `--no-augment` turns both off everywhere (centre crop).

fer_jax's GFLOP/s column is 3 x the forward FLOPs that XLA's cost analysis counts for the model
with lowering='xla' (the C++ kernels are custom calls, which XLA does not count), times its
images/s; "of peak" divides it by this machine's float32 matmul speed, measured here with a
jitted jnp.dot of two N x N matrices (--peak-size) before and after the runs (the larger).

Machines drift, so runs alternate: the order of the frameworks rotates from row to row and
reverses every round. The Keras Python is --keras-python, else $FER_JAX_KERAS_PYTHON, else
.venv-keras/bin/python in the repo root, else venv-keras/bin/python next to the repo; the
PyTorch one likewise (--torch-python, $FER_JAX_TORCH_PYTHON, .venv-torch, venv-torch). A peer
whose Python is missing or cannot import its framework is skipped with a message saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
sys.path.insert(0, REPO)
import train_throughput  # noqa: E402  (its module level is the standard library only)

DEFAULT_MODELS = ('seed_cnn', 'vgg_fer_compact', 'vgg_fer', 'resnet18:32')
FRAMEWORKS = {  # name: (table title, the peer's framework module, the peer's venv)
  'fer_jax': ('fer_jax', None, None),
  'keras': ('Keras', 'tensorflow', 'keras'),
  'torch': ('PyTorch', 'torch', 'torch'),
  'torch_compile': ('torch.compile', 'torch', 'torch'),
}
RUN_TIMEOUT_S = 1800


def default_python(venv: str) -> str:
  """$FER_JAX_<VENV>_PYTHON, else the first existing candidate, else the repo-local path."""
  if env := os.environ.get(f'FER_JAX_{venv.upper()}_PYTHON'):
    return env
  candidates = [
    os.path.join(REPO, f'.venv-{venv}', 'bin', 'python'),
    os.path.join(os.path.dirname(REPO), f'venv-{venv}', 'bin', 'python'),
  ]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def framework_version(python: str, module: str) -> tuple[str | None, str]:
  """(version, '') if `python` imports `module`, else (None, why not)."""
  if not os.path.exists(python):
    return None, f'{python} does not exist'
  try:
    out = subprocess.run(
      [python, '-c', f'import {module}; print({module}.__version__)'],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    )
  except (OSError, subprocess.TimeoutExpired) as e:
    return None, f'{python}: {e}'
  if out.returncode:
    tail = (out.stderr.strip().splitlines() or ['(no output)'])[-1]
    return None, f'{python} cannot import {module}: {tail}'
  return out.stdout.strip().splitlines()[-1], ''


def parse_model(text: str) -> tuple[str, float | None]:
  """'resnet18:32' -> ('resnet18', 32.0); 'vgg_fer' -> ('vgg_fer', None)."""
  name, _, width = text.partition(':')
  if name not in train_throughput.MODEL_CONFIGS:
    raise SystemExit(f'--models: {name!r} is not one of {sorted(train_throughput.MODEL_CONFIGS)}')
  try:
    return name, float(width) if width else None
  except ValueError:
    raise SystemExit(f'--models: {text!r}: the width after ":" is not a number') from None


def model_spec(name: str, width: float | None) -> dict:
  """fer_jax's model for the zoo entry: trainable params, forward FLOPs per image (XLA's count,
  lowering='xla') and the peers' flags describing the same network and recipe."""
  import jax
  import jax.numpy as jnp

  from fer_jax import augment, models

  config = train_throughput.load_config(train_throughput.MODEL_CONFIGS[name], width=width)
  config.model.lowering = 'xla'  # custom calls have no FLOP count
  model = models.get_model(config.model, 7)
  size = int(config.model.image_size)
  x = jax.ShapeDtypeStruct((8, size, size, 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  params = variables['params']
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost['flops']) / x.shape[0]

  m, t, a = config.model, config.train, config.augment
  if str(a.standardize) not in ('per_image', 'dataset'):
    raise SystemExit(f'{name}: the peers do not implement standardize={a.standardize!r}')
  flags = ['--model-name', name + (f':{width:g}' if width else ''), '--size', str(size)]
  flags += ['--crop', str(augment.crop_side(48, a)), '--standardize', str(a.standardize)]
  if m.name == 'seed_cnn':
    flags += ['--net', 'seed_cnn', '--dropout', ','.join(str(r) for r in m.dropout)]
  elif m.name == 'vgg_fer':
    convs = sorted(
      (int(g[1]), g[2], params[k]['conv']['kernel'].shape[-1])
      for k in params
      if (g := re.fullmatch(r'conv(\d+)([a-z])', k))
    )
    blocks = {}
    for block, _, channels in convs:
      blocks.setdefault(block, []).append(str(channels))
    dense = sorted((int(k[5:]), params[k]['kernel'].shape[-1]) for k in params if k[:5] == 'dense')
    flags += ['--net', 'vgg', '--blocks', '/'.join(','.join(c) for c in blocks.values())]
    flags += ['--dense', ','.join(str(d) for _, d in dense), '--dropout', str(m.dropout)]
  elif m.name == 'resnet18':
    stages = {}
    for k in params:
      if g := re.fullmatch(r'stage(\d+)_block(\d+)', k):
        stages[int(g[1])] = max(stages.get(int(g[1]), 0), int(g[2]))
    flags += ['--net', 'resnet', '--width', str(params['stem']['conv']['kernel'].shape[-1])]
    flags += ['--stages', ','.join(str(stages[i]) for i in sorted(stages))]
    flags += ['--dropout', str(m.dropout)]
  else:
    raise SystemExit(f'{name}: no peer network for model {m.name!r}')
  flags += ['--optimizer', str(t.optimizer), '--lr', str(t.learning_rate)]
  flags += ['--weight-decay', str(t.weight_decay), '--momentum', str(t.get('momentum', 0.9))]
  flags += [] if t.get('nesterov', True) else ['--no-nesterov']
  l2 = float(t.l2) if m.name == 'seed_cnn' or t.get('l2_scope', 'model') == 'all' else 0.0
  flags += ['--l2', str(l2), '--label-smoothing', str(t.label_smoothing)]
  flags += ['--ema', str(t.get('ema_decay', 0.0))]
  trainable = models.count_params(params)
  flags += ['--expect-params', str(trainable)]
  return {'params': trainable, 'forward_flops': flops, 'size': size, 'peer_flags': flags}


def matmul_peak_gflops(n: int, reps: int = 5) -> float:
  """float32 GFLOP/s of a jitted N x N matmul on this machine (median of `reps` after warm-up)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e9


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
    print(f'  {result["images_per_s"]} img/s ({record["wall_s"]} s)', file=sys.stderr, flush=True)
  return record


def _median(records: list[dict]) -> float | None:
  rates = [r['result']['images_per_s'] for r in records if 'result' in r]
  return statistics.median(rates) if rates else None


def _ratio(a: float | None, b: float | None) -> float | None:
  return round(a / b, 3) if a and b else None


def _cell(v: float | None, fmt: str) -> str:
  return '-' if v is None else format(v, fmt)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--models', nargs='+', default=list(DEFAULT_MODELS), help='zoo names, NAME:WIDTH to set width'
  )
  p.add_argument('--batches', nargs='+', type=int, default=[64, 256])
  p.add_argument(
    '--frameworks',
    nargs='+',
    default=['fer_jax', 'keras', 'torch'],
    choices=sorted(FRAMEWORKS),
    help='fer_jax always runs; torch_compile is opt-in (its compilation takes minutes)',
  )
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--windows', type=int, default=3)
  p.add_argument(
    '--images-per-window',
    type=int,
    default=256,
    help='steps per window = ceil(this / batch), the same on every side',
  )
  p.add_argument(
    '--warmup-images',
    type=int,
    default=128,
    help='untimed steps first (compilation) = ceil(this / batch), every side',
  )
  p.add_argument('--no-augment', action='store_true', help='no crop or flip on any side')
  p.add_argument('--peak-size', type=int, default=2048, help='N of the N x N matmul peak')
  p.add_argument('--jax-python', default=sys.executable)
  p.add_argument('--keras-python', default=default_python('keras'))
  p.add_argument('--torch-python', default=default_python('torch'))
  p.add_argument('--extra-jax-args', default='', help='e.g. "--lowering xla"')
  p.add_argument('--extra-keras-args', default='', help='e.g. "--onednn on"')
  p.add_argument('--extra-torch-args', default='', help='e.g. "--channels-last"')
  args = p.parse_args()
  zoo = [parse_model(m) for m in args.models]
  frameworks = ['fer_jax'] + [f for f in args.frameworks if f != 'fer_jax']

  pythons = {'keras': args.keras_python, 'torch': args.torch_python}
  versions, skipped = {}, {}
  for f in frameworks[1:]:
    _, module, venv = FRAMEWORKS[f]
    if venv not in versions:
      versions[venv] = framework_version(pythons[venv], module)
    version, why = versions[venv]
    if version is None:
      skipped[f] = why
      print(
        f'{FRAMEWORKS[f][0]} skipped: {why}. Create its venv as benchmarks/README.md says '
        f'("Peer virtualenvs") or pass --{venv}-python.',
        file=sys.stderr,
      )
  running = [f for f in frameworks if f not in skipped]

  specs = {}
  for name, width in zoo:
    specs[(name, width)] = model_spec(name, width)
    s = specs[(name, width)]
    print(
      f'{name} width={width}: {s["params"]:,} params, {s["forward_flops"] / 1e9:.3f} GFLOP '
      'forward per image',
      file=sys.stderr,
    )
  peaks = [matmul_peak_gflops(args.peak_size)]
  print(f'f32 matmul peak: {peaks[0]:.1f} GFLOP/s', file=sys.stderr, flush=True)

  def command(framework: str, name: str, width: float | None, batch: int) -> list[str]:
    steps, warmup = -(-args.images_per_window // batch), -(-args.warmup_images // batch)
    timing = ['--batch', str(batch), '--windows', str(args.windows)]
    timing += ['--steps-per-window', str(steps), '--warmup-steps', str(max(1, warmup))]
    timing += ['--no-augment'] if args.no_augment else []
    if framework == 'fer_jax':
      cmd = [args.jax_python, 'benchmarks/train_throughput.py', '--model', name]
      cmd += ['--width', f'{width:g}'] if width else []
      cmd += timing + ([] if args.no_augment else ['--augment', 'crop_flip'])
      return cmd + shlex.split(args.extra_jax_args)
    venv = FRAMEWORKS[framework][2]
    cmd = [pythons[venv], f'benchmarks/peer_{venv}.py'] + specs[(name, width)]['peer_flags']
    cmd += timing + (['--compile'] if framework == 'torch_compile' else [])
    return cmd + shlex.split(getattr(args, f'extra_{venv}_args'))

  rows = [(name, width, batch) for name, width in zoo for batch in args.batches]
  runs: list[dict] = []
  for r in range(args.rounds):
    for i, (name, width, batch) in enumerate(rows):
      k = (r + i) % len(running)
      order = running[k:] + running[:k]
      for framework in order if r % 2 == 0 else order[::-1]:
        record = run_one(framework, command(framework, name, width, batch))
        record.update(round=r, model=name, width=width, batch=batch)
        runs.append(record)
  peaks.append(matmul_peak_gflops(args.peak_size))
  peak = max(peaks)

  peers = frameworks[1:]
  titles = ['model', 'batch'] + [f'{FRAMEWORKS[f][0]} img/s' for f in frameworks]
  titles += [f'fer_jax / {FRAMEWORKS[f][0]}' for f in peers]
  titles += ['fer_jax GFLOP/s', 'of f32 matmul peak']
  print()
  print('| ' + ' | '.join(titles) + ' |')
  print('|' + '---|' * len(titles))
  summary = []
  for name, width, batch in rows:
    spec = specs[(name, width)]
    mine = [x for x in runs if (x['model'], x['width'], x['batch']) == (name, width, batch)]
    rate = {f: _median([x for x in mine if x['framework'] == f]) for f in frameworks}
    ratio = {f: _ratio(rate['fer_jax'], rate[f]) for f in peers}
    gflops = rate['fer_jax'] and 3 * spec['forward_flops'] * rate['fer_jax'] / 1e9
    label = name + (f':{width:g}' if width else '')
    summary.append(
      {
        'model': label,
        'batch': batch,
        'params': spec['params'],
        'forward_gflop_per_image': round(spec['forward_flops'] / 1e9, 4),
        'images_per_s': rate,
        'fer_jax_over': ratio,
        'fer_jax_gflops': round(gflops, 1) if gflops else None,
        'fraction_of_peak': round(gflops / peak, 3) if gflops else None,
      }
    )
    cells = [label, str(batch)] + [_cell(rate[f], '.1f') for f in frameworks]
    cells += [_cell(ratio[f], '.2f') for f in peers]
    cells += [_cell(gflops or None, '.1f'), _cell(gflops and gflops / peak, '.0%')]
    print('| ' + ' | '.join(cells) + ' |')
  print(
    json.dumps(
      {
        'summary': summary,
        'matmul_peak_gflops': [round(x, 1) for x in peaks],
        'peak_size': args.peak_size,
        'flops_note': "3 x XLA's forward count (lowering='xla'), per image",
        'rounds': args.rounds,
        'augment': 'none' if args.no_augment else 'crop_flip',
        'windows': args.windows,
        'images_per_window': args.images_per_window,
        'warmup_images': args.warmup_images,
        'pythons': {'jax': args.jax_python, **pythons},
        'versions': {k: v[0] for k, v in versions.items()},
        'skipped': skipped,
        'cpu_count': os.cpu_count(),
        'runs': runs,
      }
    )
  )


if __name__ == '__main__':
  main()
