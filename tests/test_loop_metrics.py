"""Device-side metric sums (one transfer per log window) and the eval/checkpoint cadence."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fer_jax import loop_metrics, train
from tests.conftest import synthetic_config


def test_sums_keep_the_first_non_finite_step():
  shapes = {
    'loss': jax.ShapeDtypeStruct((), jnp.float32),
    'accuracy': jax.ShapeDtypeStruct((), jnp.float32),
  }
  acc = loop_metrics.zeros_like_metrics(shapes)
  step_fn = jax.jit(loop_metrics.accumulate)
  for step, loss in enumerate([1.0, 3.0, np.inf, np.nan], start=11):
    acc = step_fn(acc, {'loss': jnp.float32(loss), 'accuracy': jnp.float32(0.5)}, jnp.int32(step))
  host = loop_metrics.to_host(acc)
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(host))
  assert int(host['count']) == 4 and int(host['first_bad_step']) == 13
  assert float(host['first_bad_loss']) == np.inf
  assert loop_metrics.means(host)['accuracy'] == 0.5


def test_cadence_epochs_steps_minutes(monkeypatch):
  cfg = ml_collections.ConfigDict(
    {'eval_every_epochs': 2, 'checkpoint_every_steps': 0, 'eval_every_minutes': 0.5}
  )
  clock = [1000.0]
  monkeypatch.setattr(loop_metrics.time, 'time', lambda: clock[0])
  cadence = loop_metrics.Cadence(cfg, steps_per_epoch=10)
  assert [s for s in range(1, 41) if cadence.due(s, window_end=False)] == [20, 40]
  assert not cadence.due(5, window_end=True)
  clock[0] += 31
  assert not cadence.due(5, window_end=False)  # the clock is read at window ends only
  assert cadence.due(6, window_end=True)
  cadence.done()
  assert not cadence.due(7, window_end=True)
  default = loop_metrics.Cadence(ml_collections.ConfigDict({}), steps_per_epoch=10)
  assert [s for s in range(1, 31) if default.due(s, window_end=True)] == [10, 20, 30]


def test_eval_every_two_epochs_end_to_end(tmp_path):
  config = synthetic_config(
    train_examples=128,
    test_examples=32,
    batch_size=32,
    eval_batch_size=32,
    epochs=3,
    log_every_steps=2,
    eval_every_epochs=2,
  )
  results = train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [r['step'] for r in records if r['split'] == 'PublicTest']
  assert evals == [8, 12]  # epoch 2, and the last step
  assert [r['step'] for r in records if r['split'] == 'train'] == [4, 8, 12]
  windows = [r for r in records if r['split'] == 'train_steps']
  assert [r['step'] for r in windows] == [2, 4, 6, 8, 10, 12]
  assert all(np.isfinite(r['loss']) and 0 <= r['accuracy'] <= 1 for r in windows)
  assert results['steps'] == 12


def test_accelerator_config_resolves_batch_and_lr_per_device():
  from experiments import accelerator
  from fer_jax import scaling
  from fer_jax.config_checks import validate_config
  from fer_jax.train_step import learning_rate_schedule

  config = accelerator.get_config()
  validate_config(config)
  assert config.model.dtype == 'bfloat16' and config.train.warmup_steps > 0
  resolved = scaling.resolve(config, 8)
  assert resolved.train.batch_size == 1024 and resolved.train.per_device_batch_size == 0
  assert np.isclose(resolved.train.learning_rate, 2e-3 * np.sqrt(1024 / 32))
  assert config.train.batch_size == 32  # the given config is not changed
  schedule = learning_rate_schedule(resolved.train, steps_per_epoch=28)
  assert float(schedule(150)) == pytest.approx(resolved.train.learning_rate / 2, rel=1e-3)
  from experiments import base

  assert scaling.resolve(base.get_config(), 8).train.batch_size == 32  # off by default
