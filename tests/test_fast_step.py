"""The speed switches of the train step change the speed, not the maths.

Chunked (microbatched) gradients and evaluation must equal the whole-batch ones, under jit on
the mesh (4 simulated devices) and under pmap, with dropout and augmentation on.
"""

import jax
import numpy as np
import optax
import pytest

from experiments import base
from fer_jax import parallel
from fer_jax.errors import ConfigError
from fer_jax.train import compile_steps, make_step_context
from fer_jax.train_step import create_train_state, model_variables, resolve_microbatch
from tests.conftest import one_train_step


def _steps(microbatch: int, mode: str):
  c = base.get_config()
  c.train.microbatch_size = microbatch
  c.train.schedule = 'constant'
  c.augment.rotation_deg = 10.0  # a real resample, not only flips
  c.model.dropout = (0.25, 0.25, 0.5)
  ctx = make_step_context(
    c, num_classes=7, weights=np.linspace(0.5, 2, 7).astype(np.float32), mean=0.5, std=0.25
  )
  mesh = parallel.make_mesh()
  # Plain SGD: the update is the gradient itself (adam would amplify float noise in tiny
  # gradients into sign flips of the update).
  state = jax.jit(
    lambda: create_train_state(ctx, optax.sgd(1.0)), out_shardings=parallel.replicated(mesh)
  )()
  steps = compile_steps(ctx, mode, mesh)
  return ctx, steps, steps.prepare_state(state)


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8),
    'label': rng.integers(0, 7, n).astype(np.int32),
  }


def _rel_diff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_microbatched_step_equals_whole_batch(mode):
  assert jax.device_count() == 4
  batch = _batch(32)  # 8 per device
  results = {}
  for microbatch in (0, 2):  # whole batch vs 4 chunks of 2 per device
    ctx, steps, state = _steps(microbatch, mode)
    assert ctx.microbatch == microbatch
    before = parallel.to_host(steps.canonical(state).params)
    state, metrics = one_train_step(ctx, steps, state, batch, mode, parallel.make_mesh())
    after = parallel.to_host(steps.canonical(state).params)
    results[microbatch] = (jax.tree.map(np.subtract, before, after), metrics)
  (g0, m0), (g2, m2) = results[0], results[2]  # SGD with lr 1: the updates are the gradients
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g0)):
    assert np.abs(b).max() > 0
    assert _rel_diff(a, b) < 1e-5
  for k in ('loss', 'data_loss', 'accuracy'):
    assert m2[k] == pytest.approx(m0[k], rel=1e-5)


def test_chunked_eval_equals_whole_batch():
  batch = _batch(40, seed=1)  # 10 per device: chunks of 5 even when 4 is asked for
  batch['mask'] = (np.arange(40) < 37).astype(np.float32)
  outs = {}
  for microbatch in (0, 4):
    _, steps, state = _steps(microbatch, 'jit')
    outs[microbatch], _ = steps.eval(model_variables(state), batch)
  np.testing.assert_array_equal(outs[4]['confusion'], outs[0]['confusion'])
  assert outs[4]['confusion'].sum() == 37
  assert float(outs[4]['loss_sum']) == pytest.approx(float(outs[0]['loss_sum']), rel=1e-5)


@pytest.mark.parametrize(
  'requested,per_device,backend,expected',
  [
    (-1, 64, 'cpu', 32),
    (-1, 256, 'cpu', 32),
    (-1, 40, 'cpu', 20),  # the largest divisor of the batch up to 32
    (-1, 32, 'cpu', 0),  # the whole per-device batch fits: no chunking
    (-1, 64, 'gpu', 0),
    (-1, 8, 'cpu', 0),
    (0, 64, 'cpu', 0),
    (16, 64, 'tpu', 16),
  ],
)
def test_resolve_microbatch(requested, per_device, backend, expected):
  assert resolve_microbatch(requested, per_device, backend) == expected


@pytest.mark.parametrize('requested', [-2, 24])
def test_resolve_microbatch_rejects_bad_sizes(requested):
  with pytest.raises(ConfigError, match='microbatch_size'):
    resolve_microbatch(requested, 64, 'cpu')
