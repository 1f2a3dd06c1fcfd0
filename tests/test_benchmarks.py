"""The benchmark scripts run and print their JSON; peers without their venvs are skipped cleanly."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _unoptimised_subprocesses(monkeypatch):
  """The scripts run here compile many programs and time one or two calls of each: XLA's
  optimisation (off in this process, conftest.py) costs them more than it saves. The two
  slowest took 26 s and 20 s instead of 61 s and 47 s (benchmarks/README.md)."""
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')


def _run(script: str, *args: str, timeout: int = 300, env: dict | None = None):
  """Runs `benchmarks/<script>` with this Python in the repo root; returns the finished process."""
  return subprocess.run(
    [sys.executable, f'benchmarks/{script}', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _run_ok(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  """`_run`, asserting that the script exited 0 (its stderr's tail in the failure)."""
  out = _run(script, *args, **kwargs)
  assert out.returncode == 0, out.stderr[-2000:]
  return out


def _last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def test_train_throughput_prints_its_settings():
  out = _run_ok(
    'train_throughput.py',
    '--size',
    '48',
    '--batch',
    '8',
    '--windows',
    '2',
    '--steps-per-window',
    '1',
  )
  result = _last_json(out.stdout)
  assert result['images_per_s'] > 0 and len(result['windows']) == 2
  assert (result['size'], result['batch'], result['augment']) == (48, 8, True)
  for key in (
    'devices',
    'dtype',
    'lowering',
    'lowering_resolved',
    'parallel',
    'microbatch',
    'malloc_tuned',
  ):
    assert key in result


def test_train_throughput_times_zoo_models_in_alternation():
  out = _run_ok(
    'train_throughput.py',
    '--model',
    'seed_cnn',
    'vgg_fer_compact',
    '--lowering',
    'auto',
    '--width',
    '0.125',
    '--size',
    '16',
    '--batch',
    '4',
    '--windows',
    '2',
    '--steps-per-window',
    '1',
  )
  lines = [json.loads(l) for l in out.stdout.strip().splitlines()]
  assert [(l['zoo_name'], l['model']) for l in lines] == [
    ('seed_cnn', 'seed_cnn'),
    ('vgg_fer_compact', 'vgg_fer'),
  ]
  assert lines[1]['width'] == 0.125 and lines[1]['size'] == 16  # cpu_budget's model, shrunk
  assert all(l['images_per_s'] > 0 and len(l['windows']) == 2 and l['augment'] for l in lines)
  order = [l.split(':')[0] for l in out.stderr.splitlines() if l.startswith('window ')]
  assert order == [
    'window 0 seed_cnn auto',
    'window 0 vgg_fer_compact auto',
    'window 1 seed_cnn auto',
    'window 1 vgg_fer_compact auto',
  ]


def test_train_throughput_times_config_variants_in_alternation():
  tiny = ['--size', '16', '--batch', '4', '--windows', '2', '--steps-per-window', '1']
  out = _run_ok(
    'train_throughput.py',
    '--model',
    'vgg_fer_compact',
    '--variant',
    'model.width=0.125',
    '--variant',
    'model.width=1.0',
    'model.blocks=(4, 8, 8, 16)',
    'model.dense=(8,)',
    *tiny,
  )
  lines = [json.loads(l) for l in out.stdout.strip().splitlines()]
  assert [l['variant'] for l in lines] == [
    ['model.width=0.125'],
    ['model.width=1.0', 'model.blocks=(4, 8, 8, 16)', 'model.dense=(8,)'],
  ]
  assert [l['width'] for l in lines] == [0.125, 1.0]
  # blocks 4/8/8/16 (conv 3x3 + bias, BatchNorm scale + bias): 48 + 156 + 312 + 600 + 600 +
  # 600 + 1,200 + 2,352 = 5,868 in the convs, Dense 1*1*16 -> 8 (136) and the logits (63).
  assert lines[1]['params'] == 6_067
  order = [l.split(':')[0] for l in out.stderr.splitlines() if l.startswith('window ')]
  assert order[:2] == [
    'window 0 vgg_fer_compact model.width=0.125 auto',
    'window 0 vgg_fer_compact model.width=1.0 model.blocks=(4, 8, 8, 16) model.dense=(8,) auto',
  ]
  for setting, error in [
    ('model.nope=1', "--variant 'model.nope=1': the config has no model.nope"),
    ('nope.width=1', "--variant 'nope.width=1': the config has no nope.width"),
    ("model.blocks='x'", '--variant "model.blocks=\'x\'": '),
  ]:
    bad = _run('train_throughput.py', '--model', 'vgg_fer_compact', '--variant', setting, *tiny)
    assert bad.returncode != 0 and error in bad.stderr and 'Traceback' not in bad.stderr


def test_forward_backward_prints_one_line_per_lowering():
  out = _run_ok(
    'forward_backward.py',
    '--config',
    'experiments/cpu_budget.py',
    '--lowering',
    'auto',
    'xla',
    '--batch',
    '4',
    '--width',
    '0.125',
    '--calls',
    '1',
  )
  lines = [json.loads(l) for l in out.stdout.strip().splitlines()]
  assert [l['lowering'] for l in lines] == ['auto', 'xla']
  assert all(l['model'] == 'vgg_fer' and l['images_per_s'] > 0 for l in lines)


def test_forward_backward_times_the_forward_pass_of_a_model_without_its_dense_layers():
  out = _run_ok(
    'forward_backward.py',
    *('--config', 'experiments/cpu_budget.py', '--lowering', 'auto', '--batch', '2'),
    *('--width', '0.125', '--calls', '1', '--forward-only', '--dense', ''),
  )
  line = _last_json(out.stdout)
  assert (line['pass'], line['dense'], line['batch']) == ('forward', [], 2)
  assert line['images_per_s'] > 0


def test_compare_peers_without_peer_venvs_reports_fer_jax_only(tmp_path):
  out = _run_ok(
    'compare_peers.py',
    '--models',
    'seed_cnn',
    '--batches',
    '8',
    '--windows',
    '1',
    '--images-per-window',
    '8',
    '--warmup-images',
    '1',
    '--peak-size',
    '256',
    '--keras-python',
    str(tmp_path / 'no-keras'),
    '--torch-python',
    str(tmp_path / 'no-torch'),
  )
  assert 'Keras skipped' in out.stderr and 'PyTorch skipped' in out.stderr
  result = _last_json(out.stdout)
  assert set(result['skipped']) == {'keras', 'torch'}
  assert 'does not exist' in result['skipped']['keras']
  (row,) = result['summary']
  assert (row['model'], row['batch'], row['params']) == ('seed_cnn', 8, 839_047)
  assert row['images_per_s']['fer_jax'] > 0 and row['images_per_s']['keras'] is None
  assert row['fer_jax_over'] == {'keras': None, 'torch': None}
  # 3 x XLA's forward count of the seed CNN (19.4 MFLOP per 48x48 image) x img/s.
  assert 0.018 < row['forward_gflop_per_image'] < 0.021
  assert row['fer_jax_gflops'] > 0 and 0 < row['fraction_of_peak']
  assert len(result['matmul_peak_gflops']) == 2 and min(result['matmul_peak_gflops']) > 0
  header = next(l for l in out.stdout.splitlines() if l.startswith('| model'))
  table = [l for l in out.stdout.splitlines() if l.startswith('| seed_cnn')]
  # model, batch, 3 img/s, 2 ratios, GFLOP/s, fraction of peak: 9 cells
  assert header.count('|') == 10 and len(table) == 1 and table[0].count('|') == 10
  assert '| - | - |' in table[0]  # the skipped peers


def test_conv_kernels_benchmark_prints_a_row_per_shape():
  from fer_jax import native

  if not native.available():
    pytest.skip(f'native kernels unavailable: {native.unavailable_reason()}')
  out = _run_ok('conv_kernels.py', '--reps', '1', '--only', 'c2f48,c1dk48')
  rows = _last_json(out.stdout)['rows']
  assert [r['row'] for r in rows] == ['c2f48', 'c1dk48']
  assert all(r['native_ms'] > 0 and r['xla_ms'] > 0 for r in rows)
  out = _run_ok('conv_kernels.py', '--reps', '1', '--only', 'v3f11,v3dk11', '--against', 'bf16')
  result = _last_json(out.stdout)
  assert [r['row'] for r in result['rows']] == ['v3f11', 'v3dk11']
  assert all(r['native_ms'] > 0 and r['bf16_ms'] > 0 for r in result['rows'])
  assert result['bf16_products'] == native.bf16_products()


def test_ablations_report_each_variant_against_the_default():
  out = _run_ok(
    'ablations.py',
    '--rounds',
    '1',
    '--rows',
    '48x8',
    '--only',
    'async,whole_batch',
    '--windows',
    '1',
    '--steps-per-window',
    '1',
    timeout=600,
  )
  summary = _last_json(out.stdout)['summary']
  assert [s['variant'] for s in summary] == ['default', 'async', 'whole_batch']
  assert summary[0]['relative_to_default'] == 1.0
  assert all(s['images_per_s'] > 0 for s in summary)
  runs = _last_json(out.stdout)['runs']
  assert any('--async-dispatch' in r['cmd'] for r in runs)


def test_train_loop_null_row_on_resident_data_in_blocks():
  # The smallest host-time row: 1 device, batch 32, 512 faces, 20 steps in blocks of 2 (the
  # indices path), the step a no-op: host µs/step is the loop's wall time, so it is positive.
  out = _run_ok(
    'train_loop.py',
    *('--row', 'null,1,32', '--steps', '20', '--dispatch', '2', '--examples', '512'),
    env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
  )
  row = _last_json(out.stdout)
  assert (row['devices'], row['batch'], row['feed'], row['steps_per_dispatch']) == (
    1,
    32,
    'device',
    2,
  )
  assert row['loop_images_per_s'] > 0 and row['step_images_per_s'] > 0
  assert row['host_us_per_step'] == row['loop_us_per_step'] > 0


def test_augment_speed_times_each_variant_against_the_first():
  args = ['--batch', '4', '--windows', '1', '--calls-per-window', '1']
  out = _run_ok(
    'augment_speed.py', *args, '--variant', 'shift=0.1', '--variant', 'shift=0.1,whole_pixels=True'
  )
  rows = _last_json(out.stdout)['rows']
  assert [r['variant'] for r in rows] == ['shift=0.1', 'shift=0.1,whole_pixels=True']
  assert rows[0]['ratio'] == 1.0 and all(r['images_per_s'] > 0 for r in rows)
  bad = _run('augment_speed.py', *args, '--variant', 'shfit=0.1')
  assert bad.returncode != 0 and "no field 'shfit'" in bad.stderr
