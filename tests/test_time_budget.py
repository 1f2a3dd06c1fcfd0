"""`train.time_budget_min`: the epochs that fit a wall-clock budget, fixed at the first start."""

import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from fer_jax import time_budget, train
from fer_jax.errors import ConfigError
from tests.conftest import REPO, synthetic_config
from tests.test_train import final_params


def _config(**train_overrides):
  return synthetic_config(
    train_examples=384,
    test_examples=100,
    batch_size=32,
    eval_batch_size=64,
    log_every_steps=4,
    **train_overrides,
  )


def test_epochs_that_fit_counts_steps_evaluations_and_the_final_evaluation():
  fit = dict(step_s=0.1, steps_per_epoch=10, eval_s=1.0, final_eval_s=5.0, max_epochs=100)
  # 100 s less the 3 % margin, 10 s gone, 5.4 s for the end: 81.6 s of 2.16-s epochs (8 %
  # slower than timed).
  assert time_budget.SLOWER == 0.08
  assert time_budget.epochs_that_fit(budget=100.0, elapsed=10.0, **fit) == 37
  assert time_budget.epochs_that_fit(budget=100.0, elapsed=10.0 - 0.5, **fit) == 38  # 82.1 s
  assert time_budget.epochs_that_fit(budget=100.0, elapsed=10.0, **{**fit, 'max_epochs': 7}) == 7
  assert time_budget.epochs_that_fit(budget=100.0, elapsed=99.0, **fit) == 1  # at least one
  # Both splits single view, then flip (2 views) and ten-crop (10) on both.
  assert time_budget.final_eval_s(2.0, 100, 300, ('flip', 'tencrop')) == 2.0 * 13 * 4


def test_the_step_time_is_the_median_window_so_one_stall_does_not_count_for_the_whole_run():
  now = [0.0]
  durations = iter([5.0, 0.125] + [0.375] * 6 + [0.125] * 24)  # compile, warm-up, stall, steady

  def train_fn(state, batch, sums):
    now[0] += next(durations)
    return state + 1, jax.numpy.zeros(())

  step_s, first_s, windows, state = time_budget.time_train_step(
    train_fn, 0, iter(range(100)), None, min_s=3.75, clock=lambda: now[0]
  )
  assert state == 32 and first_s == 5.0  # 30 timed steps (3.75 s at 0.125 s), 5 windows of 6
  assert windows == [0.375, 0.125, 0.125, 0.125, 0.125]
  assert step_s == 0.125  # the mean of the steps would be 0.175
  # A host that is slower throughout is slower in the median too.
  now[0], durations = 0.0, iter([5.0] + [0.25] * 16)
  step_s, _, windows, _ = time_budget.time_train_step(
    train_fn, 0, iter(range(100)), None, min_s=3.75, clock=lambda: now[0]
  )
  assert windows == [0.25] * 5 and step_s == 0.25  # 15 steps, 3 a window


def test_only_a_fresh_full_run_of_several_epochs_times_itself():
  def cfg(**kw):
    return ml_collections.ConfigDict({'time_budget_min': 10.0, 'epochs': 30, 'max_steps': -1, **kw})

  assert time_budget.applies(cfg(), start_step=0)
  assert not time_budget.applies(cfg(), start_step=5)  # a resume keeps the epochs it fixed
  assert not time_budget.applies(cfg(time_budget_min=0.0), start_step=0)
  assert not time_budget.applies(cfg(max_steps=3), start_step=0)  # a smoke run
  assert not time_budget.applies(cfg(epochs=1), start_step=0)  # nothing to choose


@pytest.mark.parametrize('value', [-1.0, 'ten', True, float('nan')])
def test_a_bad_budget_is_a_clear_error(value):
  with pytest.raises(ConfigError, match=r'^config.train.time_budget_min=.*minutes >= 0'):
    time_budget.budget_s(ml_collections.ConfigDict({'time_budget_min': value}))
  assert time_budget.budget_s(ml_collections.ConfigDict({'time_budget_min': 2})) == 120.0


def test_process_start_time_is_when_the_process_started():
  code = (
    'import time; t = time.time(); from fer_jax import time_budget; '
    'print(time_budget.process_start_time(), t)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True
  )
  started, before_import = map(float, out.stdout.split())
  assert before_import - 30 < started <= before_import + 1  # /proc/stat's boot time is whole s


# With self-distillation the teacher's weight ramps over the epochs the budget chose, not 40.
@pytest.mark.parametrize(
  'parallel,distill',
  [('jit', {}), ('pmap', {}), ('jit', dict(ema_decay=0.9, self_distill=0.5))],
  ids=['jit', 'pmap', 'jit-self_distill'],
)
def test_a_spent_budget_trains_one_epoch_exactly_as_epochs_1_and_a_resume_keeps_it(
  tmp_path, parallel, distill
):
  budgeted = _config(epochs=40, time_budget_min=1.0, **distill)
  budgeted.parallel = parallel
  # The minute is gone before training starts: the step is timed, then one epoch (the least).
  out = train.train_and_evaluate(budgeted, str(tmp_path / 'budget'), started=time.time() - 60)
  assert out['epochs'] == out['config']['train']['epochs'] == 1 and out['steps'] == 12
  # Timing the step and the evaluation left no trace: the same run as asking for 1 epoch.
  plain = _config(epochs=1, **distill)
  plain.parallel = parallel
  train.train_and_evaluate(plain, str(tmp_path / 'plain'))
  (step_a, p_a), (step_b, p_b) = final_params(tmp_path / 'budget'), final_params(tmp_path / 'plain')
  assert step_a == step_b == 12
  for x, y in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Rerun with a full budget: the checkpoint's epoch count stands (no config-change error).
  again = train.train_and_evaluate(budgeted, str(tmp_path / 'budget'))
  assert again['epochs'] == 1 and again['steps'] == 12


def test_a_budget_that_holds_every_epoch_trains_them_all(tmp_path):
  out = train.train_and_evaluate(_config(epochs=2, time_budget_min=600.0), str(tmp_path))
  assert out['epochs'] == 2 and out['config']['train']['time_budget_min'] == 600.0
