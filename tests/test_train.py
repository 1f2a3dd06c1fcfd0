"""End to end: jit vs pmap, exact resume, results.json, launch.py on 4 simulated devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fer_jax import checkpointing, train
from fer_jax.config_checks import check_resume_config, config_changes
from fer_jax.errors import ConfigError
from tests.conftest import REPO, synthetic_config


def tiny_config(**train_overrides):
  return synthetic_config(
    train_examples=384,
    test_examples=100,
    **{
      'batch_size': 32,
      'eval_batch_size': 64,
      'epochs': 2,
      'log_every_steps': 4,
      **train_overrides,
    },
  )


def final_params(workdir):
  manager = checkpointing.make_manager(str(workdir), keep_latest=1, keep_best=1, read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored['state']['params']


def assert_trees_close(a, b, rtol, atol):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_results_json_shape(tmp_path):
  assert jax.device_count() == 4
  results = train.train_and_evaluate(tiny_config(), str(tmp_path))
  on_disk = json.loads((tmp_path / 'results.json').read_text())
  assert on_disk['best_step'] == results['best_step']
  assert on_disk['epochs'] == 2 and on_disk['train_images_per_s'] > 0 and on_disk['wall_s'] > 0
  assert on_disk['config']['train']['batch_size'] == 32
  for name, n in (('PublicTest', 100), ('PrivateTest', 100)):
    split = on_disk['splits'][name]
    assert set(split) >= {'accuracy', 'macro_f1', 'loss', 'per_class_accuracy', 'confusion_matrix'}
    cm = np.asarray(split['confusion_matrix'])
    assert cm.shape == (7, 7) and cm.sum() == n  # every example counted exactly once
    assert split['accuracy'] == pytest.approx(np.trace(cm) / n)
    assert len(split['per_class_accuracy']) == 7
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert {l['split'] for l in lines} >= {'train', 'PublicTest', 'train_steps'}
  assert os.listdir(tmp_path / 'tensorboard')


def test_pmap_equals_jit(tmp_path):
  # 12 steps an epoch: 14 steps cross the epoch boundary (a new shuffle, an evaluation).
  # Flips only: with base.py's whole-pixel shifts the two modes drift apart faster (bit-identical
  # after one step, 9e-5 apart after 14; sub-pixel shifts: 3e-7), presumably through max-pool
  # near-ties over the repeated edge pixels (benchmarks/README.md, thirteenth session).
  def cfg_for(parallel):
    c = tiny_config(max_steps=14)
    c.parallel, c.augment.shift = parallel, 0.0
    return c

  jit = train.train_and_evaluate(cfg_for('jit'), str(tmp_path / 'jit'))
  cfg = cfg_for('pmap')
  pmap = train.train_and_evaluate(cfg, str(tmp_path / 'pmap'))
  _, p_jit = final_params(tmp_path / 'jit')
  _, p_pmap = final_params(tmp_path / 'pmap')
  # 14 steps of different reduction orders: a few weights near 0 differ by ~3e-6.
  assert_trees_close(p_jit, p_pmap, rtol=1e-4, atol=1e-5)
  assert (
    jit['splits']['PublicTest']['confusion_matrix']
    == pmap['splits']['PublicTest']['confusion_matrix']
  )


def test_interrupted_and_resumed_equals_straight_run(tmp_path):
  train.train_and_evaluate(tiny_config(), str(tmp_path / 'straight'))
  train.train_and_evaluate(tiny_config(max_steps=5), str(tmp_path / 'resumed'))
  assert final_params(tmp_path / 'resumed')[0] == 5
  # Another recipe on the same workdir is refused before anything runs or is written.
  with pytest.raises(ConfigError, match=r'train.epochs=2 -> 3; train.learning_rate=.* -> 0.5'):
    train.train_and_evaluate(tiny_config(epochs=3, learning_rate=0.5), str(tmp_path / 'resumed'))
  assert final_params(tmp_path / 'resumed')[0] == 5
  train.train_and_evaluate(tiny_config(), str(tmp_path / 'resumed'))
  step_a, p_a = final_params(tmp_path / 'straight')
  step_b, p_b = final_params(tmp_path / 'resumed')
  assert step_a == step_b == 24
  for x, y in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # identical on CPU


def test_resume_config_changes_name_recipe_keys_only():
  saved = tiny_config().to_dict()
  del saved['train']['ema_decay']  # a checkpoint from before the key existed: it was off
  c = tiny_config(max_steps=3, eval_every_epochs=2, microbatch_size=0)
  c.data.path, c.model.lowering, c.parallel = 'elsewhere.csv', 'xla', 'pmap'
  assert config_changes(saved, c) == []
  c.train.ema_decay = 0.999
  assert config_changes(saved, c) == ['train.ema_decay=0.0 -> 0.999']
  c.train.ema_decay, c.augment.crop_scale = 0.0, (0.5, 1.0)
  assert config_changes(saved, c) == ['augment.crop_scale=[1.0, 1.0] -> [0.5, 1.0]']
  with pytest.raises(ConfigError, match=r'^runs/x was trained with another config \(augment'):
    check_resume_config(saved, c, 'runs/x')
  c.train.allow_config_change = True
  check_resume_config(saved, c, 'runs/x')


def test_launch_end_to_end_with_resume(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  base = [
    sys.executable,
    'launch.py',
    '--config',
    'experiments/synthetic.py',
    f'--workdir={tmp_path}',
    '--config.data.synthetic_train=384',
    '--config.data.synthetic_test=100',
    '--config.train.batch_size=32',
    '--config.train.epochs=2',
    '--config.train.eval_batch_size=64',
  ]
  first = subprocess.run(
    base + ['--config.train.max_steps=7'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'devices: 4' in first.stderr
  second = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resumed from step 7' in second.stderr
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['epochs'] == 2 and results['steps'] == 24
  assert 0 <= results['splits']['PrivateTest']['accuracy'] <= 1


def test_launch_unknown_config_key_is_a_clear_error(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      'launch.py',
      '--config',
      'experiments/synthetic.py',
      f'--workdir={tmp_path}',
      '--config.train.epoch=3',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode != 0
  assert 'epoch' in out.stderr and 'Traceback' not in out.stderr
