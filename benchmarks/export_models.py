"""Exported model sizes and single-image latency on CPU: JAX vs onnxruntime vs StableHLO.

  python benchmarks/export_models.py --workdir W [--workdir W2 ...] [--calls 200]
  python benchmarks/export_models.py --config experiments/vgg_fer2013.py [--config ...]

With --config, a workdir is made by training that experiment for ONE step on a few synthetic
faces (sizes and latencies depend on the architecture, not on the weights). Each workdir is
exported to ONNX and StableHLO in a temporary folder; then one 48x48 face (batch 1, uint8) is
classified `--calls` times by each runtime after a warm-up: fer_jax's jitted evaluation
function with the model's own lowering ('auto': the C++ kernels on CPU), the StableHLO artifact
reloaded with jax.export.deserialize (the 'xla' lowering), and onnxruntime (CPU provider,
default threads). Prints one JSON line per model and a markdown table (median ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_step_workdir(config_path: str, root: str) -> str:
  import importlib.util

  from experiments import synthetic
  from fer_jax import train

  spec = importlib.util.spec_from_file_location('experiment', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data = synthetic.get_config().data
  c.data.synthetic_train, c.data.synthetic_test = 16, 16
  c.train.batch_size, c.train.eval_batch_size = 8, 16
  c.train.epochs, c.train.max_steps, c.train.warmup_epochs = 1, 1, 0.0
  c.train.final_tta = ()
  workdir = os.path.join(root, os.path.splitext(os.path.basename(config_path))[0])
  train.train_and_evaluate(c, workdir)
  return workdir


def _median_ms(fn, calls: int) -> float:
  for _ in range(5):
    fn()
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return round(float(np.median(times)) * 1000, 3)


def measure(workdir: str, out_dir: str, calls: int) -> dict:
  import jax
  import onnxruntime as ort

  from fer_jax import evaluation, export, models

  trained = export.load_trained(workdir)
  name = str(trained.config.model.name)
  onnx_path = os.path.join(out_dir, f'{name}.onnx')
  hlo_path = os.path.join(out_dir, f'{name}.stablehlo')
  export.to_onnx(trained, onnx_path)
  export.to_stablehlo(trained, hlo_path)
  face = np.random.default_rng(0).integers(
    0, 256, (1, trained.data_size, trained.data_size, 1), dtype=np.uint8
  )
  fn = jax.jit(evaluation.probabilities_fn(trained))
  with open(hlo_path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  hlo_fn = jax.jit(exported.call)
  session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  return {
    'model': name,
    'params': models.count_params(trained.params),
    'input': f'{trained.data_size}->{trained.image_size}',
    'onnx_mb': round(os.path.getsize(onnx_path) / 1e6, 2),
    'stablehlo_mb': round(os.path.getsize(hlo_path) / 1e6, 2),
    'jax_ms': _median_ms(lambda: np.asarray(fn(trained.variables, face)), calls),
    'stablehlo_ms': _median_ms(lambda: np.asarray(hlo_fn(face)), calls),
    'onnxruntime_ms': _median_ms(lambda: session.run(None, {'images': face}), calls),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', nargs='*', default=[])
  p.add_argument('--config', nargs='*', default=[], help='experiment files, trained one step')
  p.add_argument('--calls', type=int, default=200)
  args = p.parse_args()
  if not args.workdir and not args.config:
    p.error('give --workdir or --config')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workdirs = args.workdir + [_one_step_workdir(c, tmp) for c in args.config]
    for workdir in workdirs:
      row = measure(workdir, tmp, args.calls)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(
    '\n| model | params | input | ONNX MB | StableHLO MB | JAX ms | StableHLO ms | onnxruntime ms |'
  )
  print('|---|---:|---|---:|---:|---:|---:|---:|')
  for r in rows:
    print(
      f'| {r["model"]} | {r["params"]:,} | {r["input"]} | {r["onnx_mb"]} | '
      f'{r["stablehlo_mb"]} | {r["jax_ms"]} | {r["stablehlo_ms"]} | {r["onnxruntime_ms"]} |'
    )


if __name__ == '__main__':
  main()
