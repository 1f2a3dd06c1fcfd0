"""launch.py as several processes (jax.distributed on 127.0.0.1, gloo) and under SIGTERM.

Every test runs launch.py in subprocesses with a bounded wait and kills whatever is still
running when it ends, passed or not.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fer_jax import checkpointing, preemption
from tests.conftest import REPO

TINY = [
  '--config',
  'experiments/synthetic.py',
  '--config.data.synthetic_train=384',
  '--config.data.synthetic_test=100',
  '--config.train.batch_size=32',
  '--config.train.eval_batch_size=64',
  '--config.train.log_every_steps=4',
]
RUN_TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, extra, *, devices, log, procs, process_id=None, num_processes=1, port=None):
  """Starts launch.py with `devices` CPU devices, its output in `log`; registers it in `procs`."""
  args = [sys.executable, 'launch.py', *TINY, f'--workdir={workdir}', *extra]
  if num_processes > 1:
    args += [
      f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={num_processes}',
      f'--process_id={process_id}',
    ]
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
  )
  with open(log, 'w') as f:
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  procs.append(proc)
  return proc


def _start_pair(workdir, extra, *, logs, procs):
  """Starts launch.py as 2 processes x 2 CPU devices on a fresh coordinator port; process i
  logs to logs[i]."""
  port = _free_port()
  return [
    _start(
      workdir,
      extra,
      devices=2,
      log=log,
      procs=procs,
      process_id=i,
      num_processes=2,
      port=port,
    )
    for i, log in enumerate(logs)
  ]


def _wait_ok(proc, log, timeout=RUN_TIMEOUT_S) -> str:
  rc = proc.wait(timeout=timeout)
  text = log.read_text()
  assert rc == 0, text[-3000:]
  return text


def _wait_for(log, pattern, proc, timeout=RUN_TIMEOUT_S) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if re.search(pattern, log.read_text()):
      return
    if proc.poll() is not None:
      raise AssertionError(
        f'exited ({proc.returncode}) before {pattern!r}:\n' + log.read_text()[-3000:]
      )
    time.sleep(0.02)
  raise AssertionError(f'no {pattern!r} within {timeout} s')


def _kill_all(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait(timeout=30)


SIX_STEPS = ['--config.train.epochs=1', '--config.train.max_steps=6']


@pytest.fixture(scope='module')
def six_steps(tmp_path_factory):
  """(workdir, log) of 1 process x 4 devices stopped at step 6 of 12: the reference of the
  2 x 2 run and the start of the resumed one. Tests that resume it work on a copy."""
  path = tmp_path_factory.mktemp('six_steps')
  procs = []
  with pytest.MonkeyPatch.context() as mp:  # module scope: set up before conftest's cache fixture
    # The session's data cache, which the later processes share.
    mp.setenv('FER_JAX_CACHE', str(tmp_path_factory.getbasetemp() / 'fer_jax_cache'))
    try:
      proc = _start(path / 'run', SIX_STEPS, devices=4, log=path / 'run.log', procs=procs)
      log = _wait_ok(proc, path / 'run.log')
    finally:
      _kill_all(procs)
  return path / 'run', log


def final_params(workdir):
  """(latest step, params) onto this process's first device, whatever topology saved them."""
  manager = checkpointing.make_manager(str(workdir), keep_latest=1, keep_best=1, read_only=True)
  step = manager.latest_step()
  tree = ocp.StandardCheckpointer().metadata(manager.directory / str(step) / 'state').item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return step, restored['state']['params']


def _max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_watcher_single_process_sigterm_is_one_shot():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher(start_step=0) as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process lives on
    time.sleep(0.05)
    assert watcher.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) == previous  # a second SIGTERM acts as before
  assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_two_processes_of_two_devices_equal_one_of_four(six_steps, tmp_path):
  one, one_log = six_steps
  procs = []
  try:
    logs = [tmp_path / f'two{i}.log' for i in range(2)]
    pair = _start_pair(tmp_path / 'two', SIX_STEPS, logs=logs, procs=procs)
    two_logs = [_wait_ok(p, log) for p, log in zip(pair, logs)]
  finally:
    _kill_all(procs)
  assert 'devices: 4 (cpu) on 1 process(es)' in one_log
  assert all('devices: 4 (cpu) on 2 process(es)' in log for log in two_logs)

  step_one, params_one = final_params(one)
  step_two, params_two = final_params(tmp_path / 'two')
  assert step_one == step_two == 6
  diff = _max_abs_diff(params_one, params_two)
  print(f'2x2 vs 1x4: max |param difference| = {diff:.3g}')
  assert diff < 1e-5

  one_res = json.loads((one / 'results.json').read_text())
  two_res = json.loads((tmp_path / 'two' / 'results.json').read_text())
  for split in ('PublicTest', 'PrivateTest'):
    one_split, two_split = one_res['splits'][split], two_res['splits'][split]
    assert np.sum(two_split['confusion_matrix']) == 100  # the padded last batch: each once
    assert two_split['confusion_matrix'] == one_split['confusion_matrix']
    assert two_split['accuracy'] == one_split['accuracy']
    print(f'{split} accuracy: 1x4 {one_split["accuracy"]:.4f}, 2x2 {two_split["accuracy"]:.4f}')
  # Only process 0 writes logs: no record twice, one TensorBoard event file.
  one_lines = (one / 'metrics.jsonl').read_text().splitlines()
  two_lines = (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()
  assert len(two_lines) == len(one_lines)
  assert len(os.listdir(tmp_path / 'two' / 'tensorboard')) == 1


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 60)
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path):
  extra = ['--config.train.epochs=3']  # 36 steps
  procs = []
  try:
    straight = _start(
      tmp_path / 'straight', extra, devices=4, log=tmp_path / 'straight.log', procs=procs
    )
    _wait_ok(straight, tmp_path / 'straight.log')

    run = tmp_path / 'run'
    first = _start(run, extra, devices=4, log=tmp_path / 'first.log', procs=procs)
    _wait_for(tmp_path / 'first.log', r'step 4/36 ', first)
    first.send_signal(signal.SIGTERM)
    first_log = _wait_ok(first, tmp_path / 'first.log')
    stopped = int(re.search(r'preempted: checkpoint at step (\d+)', first_log).group(1))
    assert 4 <= stopped < 36
    assert final_params(run)[0] == stopped
    assert not (run / 'results.json').exists()

    second = _start(run, extra, devices=4, log=tmp_path / 'second.log', procs=procs)
    second_log = _wait_ok(second, tmp_path / 'second.log')
  finally:
    _kill_all(procs)
  assert f'resumed from step {stopped} ' in second_log
  step_a, params_a = final_params(tmp_path / 'straight')
  step_b, params_b = final_params(run)
  assert step_a == step_b == 36
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # identical on CPU
  assert json.loads((run / 'results.json').read_text())['steps'] == 36


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """The preemption service makes every process save at the same step, then all exit 0.

  The run has a time budget: both processes time the same collective steps and evaluations
  before training (process 0's count) and train the epochs process 0 chose; the resume keeps
  them."""
  # 48 steps: the 60-minute budget holds all 4 epochs.
  extra = ['--config.train.epochs=4', '--config.train.time_budget_min=60']
  run = tmp_path / 'run'
  procs = []
  try:
    pair = _start_pair(run, extra, logs=[tmp_path / f'first{i}.log' for i in range(2)], procs=procs)
    _wait_for(tmp_path / 'first0.log', r'step 4/48 ', pair[0])
    pair[1].send_signal(signal.SIGTERM)  # only one host is told
    logs = [_wait_ok(p, tmp_path / f'first{i}.log') for i, p in enumerate(pair)]
    assert all(re.search(r'time budget 60\.0 min: .* -> 4 epoch\(s\)', log) for log in logs)
    stopped = {int(re.search(r'preempted: checkpoint at step (\d+)', log).group(1)) for log in logs}
    assert len(stopped) == 1, stopped
    stopped = stopped.pop()
    assert 4 <= stopped < 48
    assert final_params(run)[0] == stopped

    pair = _start_pair(
      run, extra, logs=[tmp_path / f'second{i}.log' for i in range(2)], procs=procs
    )
    second = [_wait_ok(p, tmp_path / f'second{i}.log') for i, p in enumerate(pair)]
  finally:
    _kill_all(procs)
  assert f'resumed from step {stopped} ' in second[0]
  assert not any('time budget' in log for log in second)  # the epochs are the checkpoint's
  assert json.loads((run / 'results.json').read_text())['steps'] == 48


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 60)
def test_resume_with_another_process_count_continues_the_same_run(six_steps, tmp_path):
  """1 process x 4 devices trains to step 6; 2 processes x 2 devices resume it to step 12 and
  end where a straight 1 x 4 run does (the data position is the step, not per-process state)."""
  procs = []
  try:
    straight = _start(
      tmp_path / 'straight',
      ['--config.train.epochs=1'],
      devices=4,
      log=tmp_path / 'straight.log',
      procs=procs,
    )
    _wait_ok(straight, tmp_path / 'straight.log')
    shutil.copytree(six_steps[0], tmp_path / 'run')
    pair = _start_pair(
      tmp_path / 'run',
      ['--config.train.epochs=1'],
      logs=[tmp_path / f'resume{i}.log' for i in range(2)],
      procs=procs,
    )
    logs = [_wait_ok(p, tmp_path / f'resume{i}.log') for i, p in enumerate(pair)]
  finally:
    _kill_all(procs)
  assert all('resumed from step 6' in log for log in logs)
  step_a, params_a = final_params(tmp_path / 'straight')
  step_b, params_b = final_params(tmp_path / 'run')
  assert step_a == step_b == 12
  assert _max_abs_diff(params_a, params_b) < 1e-5
