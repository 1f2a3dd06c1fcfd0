"""The training split on the devices (data/resident.py): the step fed indices equals the step fed
host batches, on 1 and 4 simulated devices; K steps per dispatch equal K single steps; exact
resume; the on/off rule and its errors."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from fer_jax import checkpointing, loop_metrics, models, parallel, train
from fer_jax.data import resident
from fer_jax.data.datasets import load_dataset
from fer_jax.data.epoch_order import EpochBatches
from fer_jax.errors import ConfigError
from fer_jax.train_step import create_train_state, make_optimizer
from tests.conftest import synthetic_config
from tests.test_train import final_params


class _Tiny(nn.Module):
  """Dense on 8x8-pooled pixels, with dropout: compiles in a fraction of the seed CNN's time
  (the gather in front of the step, what these tests compare, does not depend on the model;
  the seed CNN gave the same bit-identical results, at ~25 s a test)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.avg_pool(x, (6, 6), (6, 6)).reshape(x.shape[0], -1)
    return nn.Dense(7)(nn.Dropout(0.2, deterministic=not train)(x))


def _setup(devices: int):
  config = synthetic_config(
    train_examples=64, test_examples=16, batch_size=16, microbatch_size=0, epochs=2
  )
  split = load_dataset(config.data, image_size=48)['Training']
  mesh = jax.make_mesh(
    (devices,),
    (parallel.DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:devices],
  )
  ctx = train.make_step_context(
    config, num_classes=7, weights=np.ones(7, np.float32), mean=0.5, std=0.25
  )
  ctx = dataclasses.replace(ctx, model=_Tiny())
  fresh_state = lambda: jax.jit(
    lambda: create_train_state(ctx, make_optimizer(config.train, 4)),
    out_shardings=parallel.replicated(mesh),
  )()
  spec = {
    'image': jax.ShapeDtypeStruct((16, 48, 48, 1), np.uint8),
    'label': jax.ShapeDtypeStruct((16,), np.int32),
  }
  state = fresh_state()
  sums = train.sums_factory(ctx, checkpointing.abstract_like(state), spec, 'jit', mesh)
  return config, split, mesh, ctx, fresh_state, sums


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('devices', [1, 4])
def test_indices_on_resident_split_equal_host_batches(devices):
  config, split, mesh, ctx, fresh_state, fresh_sums = _setup(devices)
  host, dev = (
    train.compile_steps(ctx, 'jit', mesh),
    train.compile_steps(ctx, 'jit', mesh, resident.put_split(split, mesh)),
  )
  feeds = [EpochBatches(split, global_batch=16, seed=0, indices_only=i) for i in (False, True)]
  results = []
  for steps, feed in zip((host, dev), feeds):
    state, sums = fresh_state(), fresh_sums()
    for _ in range(5):  # crosses the epoch boundary (4 steps an epoch)
      state, sums = steps.train(state, steps.put_batch(next(feed)), sums)
    results.append((_leaves(state), loop_metrics.to_host(sums)))
  for a, b in zip(results[0][0], results[1][0]):
    np.testing.assert_array_equal(a, b)  # the same rows: bit-identical
  assert results[0][1]['sum'] == results[1][1]['sum'] and results[1][1]['count'] == 5


def test_steps_per_dispatch_scan_equals_single_steps():
  config, split, mesh, ctx, fresh_state, fresh_sums = _setup(4)
  steps = train.compile_steps(ctx, 'jit', mesh, resident.put_split(split, mesh))
  single, block = (EpochBatches(split, global_batch=16, seed=0, indices_only=True) for _ in '12')
  state_a, sums_a = fresh_state(), fresh_sums()
  for _ in range(3):
    state_a, sums_a = steps.train(state_a, steps.put_batch(next(single)), sums_a)
  feed = block.next_block(3)
  assert feed['index'].shape == (3, 16) and block.step == 3
  state_b, sums_b = steps.train_block(fresh_state(), steps.put_batch(feed), fresh_sums())
  # The scan's body may be fused differently from the single step: allow float rounding.
  for a, b in zip(_leaves(state_a), _leaves(state_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  host_a, host_b = loop_metrics.to_host(sums_a), loop_metrics.to_host(sums_b)
  assert int(host_b['count']) == 3
  np.testing.assert_allclose(host_a['sum']['loss'], host_b['sum']['loss'], rtol=1e-5)


def test_resume_on_device_in_blocks_equals_the_host_fed_run(tmp_path, monkeypatch):
  monkeypatch.setitem(models.MODELS, 'tiny', lambda cfg, k: _Tiny())

  def config(on_device='off', **kw):
    c = synthetic_config(
      train_examples=96, test_examples=16, batch_size=16, epochs=2, log_every_steps=4, **kw
    )
    c.model.name, c.data.on_device = 'tiny', on_device
    return c

  # 6 steps an epoch: blocks of 2 up to 4, single steps up to the epoch end, blocks again.
  train.train_and_evaluate(config(), str(tmp_path / 'host'))
  train.train_and_evaluate(config('on', max_steps=5, steps_per_dispatch=2), str(tmp_path / 'dev'))
  assert final_params(tmp_path / 'dev')[0] == 5
  train.train_and_evaluate(config('on', steps_per_dispatch=2), str(tmp_path / 'dev'))
  (step_a, p_a), (step_b, p_b) = final_params(tmp_path / 'host'), final_params(tmp_path / 'dev')
  assert step_a == step_b == 12
  for a, b in zip(_leaves(p_a), _leaves(p_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_rule_and_its_errors():
  c = synthetic_config(train_examples=8, test_examples=8).data
  assert not resident.use_resident(c, backend='cpu', mode='jit', nbytes=1)
  assert resident.use_resident(c, backend='gpu', mode='jit', nbytes=83 * 2**20)
  assert not resident.use_resident(c, backend='tpu', mode='pmap', nbytes=1)
  assert not resident.use_resident(c, backend='gpu', mode='jit', nbytes=3 * 2**30)
  c.on_device = 'on'
  assert resident.use_resident(c, backend='cpu', mode='jit', nbytes=1)
  with pytest.raises(ConfigError, match="needs config.parallel='jit'"):
    resident.use_resident(c, backend='cpu', mode='pmap', nbytes=1)
  with pytest.raises(ConfigError, match='3072 MB per device, more than'):
    resident.use_resident(c, backend='gpu', mode='jit', nbytes=3 * 2**30)
  c.on_device = 'yes'
  with pytest.raises(ConfigError, match=r"on_device='yes': expected one of"):
    resident.setting(c)
  t = synthetic_config(train_examples=8, test_examples=8, steps_per_dispatch=4).train
  assert loop_metrics.steps_per_dispatch(t, resident=False) == 0
  t.log_every_steps = 50
  with pytest.raises(ConfigError, match='log_every_steps=50 is not a multiple of'):
    loop_metrics.steps_per_dispatch(t, resident=True)
  t.log_every_steps = 100
  assert loop_metrics.steps_per_dispatch(t, resident=True) == 4
  # Blocks of 4 stop short of an epoch end (every 6 steps) and of the stop step.
  lengths, step = [], 0
  while step < 14:
    lengths.append(loop_metrics.block_length(step, 4, periods=(100, 6, 0), stop_step=14))
    step += lengths[-1]
  assert lengths == [4, 1, 1, 4, 1, 1, 1, 1]
