"""Fault injection: NaN/Inf loss, damaged checkpoints, and SIGKILL at random points."""

import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fer_jax import checkpointing, train
from fer_jax.errors import FerJaxError
from tests.conftest import REPO, synthetic_config


def tiny_config(**train_overrides):
  """4 steps an epoch, a checkpoint every 2 steps, a constant learning rate."""
  return synthetic_config(
    train_examples=64,
    test_examples=32,
    **{
      'batch_size': 16,
      'eval_batch_size': 32,
      'epochs': 2,
      'schedule': 'constant',
      'warmup_epochs': 0.0,
      'log_every_steps': 4,
      'checkpoint_every_steps': 2,
      **train_overrides,
    },
  )


def read_only_manager(workdir) -> ocp.CheckpointManager:
  return checkpointing.make_manager(str(workdir), keep_latest=1, keep_best=1, read_only=True)


def restore_params(workdir, step: int):
  """The step's parameters and metadata, read without a target (raises if unreadable)."""
  manager = read_only_manager(workdir)
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
  finally:
    manager.close()
  assert restored['meta']['class_names']
  return restored['state']['params']


def saved_steps(workdir) -> list[int]:
  manager = read_only_manager(workdir)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory) -> pathlib.Path:
  """A run stopped at step 4 with checkpoints at steps 2 and 4; tests work on copies."""
  workdir = tmp_path_factory.mktemp('four_steps')
  with pytest.MonkeyPatch.context() as mp:  # module scope: set up before conftest's cache fixture
    mp.setenv('FER_JAX_CACHE', str(tmp_path_factory.getbasetemp() / 'fer_jax_cache'))
    train.train_and_evaluate(tiny_config(max_steps=4), str(workdir))
  assert saved_steps(workdir) == [2, 4]
  return workdir


def copy_of(workdir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  dest = tmp_path / 'workdir'
  shutil.copytree(workdir, dest)
  return dest


def damage(workdir: pathlib.Path, step: int, how: str) -> pathlib.Path:
  """Truncates or deletes the largest file of the step's train state (its array data)."""
  files = [p for p in (workdir / 'checkpoints' / str(step) / 'state').rglob('*') if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  if how == 'truncate':
    with open(victim, 'r+b') as f:
      f.truncate(victim.stat().st_size // 2)
  else:
    victim.unlink()
  return victim


# --- NaN / Inf -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'every, expected',
  [
    # Step 5's loss is finite (good parameters) but its update, with an infinite learning rate,
    # is not: a checkpoint due after step 5 is refused, else step 6's loss stops the run.
    (1, r'the parameters became non-finite at step 5'),
    (2, r'loss became (nan|inf) at step 6'),
  ],
)
def test_nan_stops_at_that_step_and_keeps_the_last_good_checkpoint(
  tmp_path, four_steps, every, expected
):
  workdir = copy_of(four_steps, tmp_path)
  # Resuming under an infinite learning rate is a deliberate change of recipe.
  config = tiny_config(
    learning_rate=float('inf'), checkpoint_every_steps=every, allow_config_change=True
  )
  with pytest.raises(FerJaxError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert re.fullmatch(
    expected + r': training diverged \(lower config.train.learning_rate\?\); '
    r'the last good checkpoint is step 4',
    message,
  ), message
  assert saved_steps(workdir) == [2, 4]  # nothing newer was written
  for leaf in jax.tree.leaves(restore_params(workdir, 4)):
    assert np.all(np.isfinite(leaf))


# --- Damaged checkpoints -------------------------------------------------------------------------


def test_unreadable_latest_checkpoint_falls_back_to_the_newest_readable(
  tmp_path, four_steps, caplog
):
  # (A deleted file is the other damage: see the next test, where it makes step 4 unreadable.)
  caplog.set_level(logging.INFO)
  workdir = copy_of(four_steps, tmp_path)
  damage(workdir, 4, 'truncate')
  train.train_and_evaluate(tiny_config(max_steps=6), str(workdir))
  assert re.search(r'checkpoint step 4 in \S+ is unreadable \(\w+', caplog.text), caplog.text
  assert 'resumed from step 2 ' in caplog.text
  set_aside = list((workdir / checkpointing.UNREADABLE_DIR).glob('*/4'))
  assert len(set_aside) == 1  # kept for inspection, out of the manager's way
  steps = saved_steps(workdir)
  assert steps[-2:] == [4, 6]  # step 4 written again, from the resumed run
  for step in steps:
    restore_params(workdir, step)


def test_no_readable_checkpoint_stops_unless_asked_to_restart(tmp_path, four_steps, caplog):
  caplog.set_level(logging.INFO)
  workdir = copy_of(four_steps, tmp_path)
  damage(workdir, 4, 'delete')
  damage(workdir, 2, 'truncate')
  with pytest.raises(FerJaxError) as info:
    train.train_and_evaluate(tiny_config(max_steps=6), str(workdir))
  message = str(info.value)
  assert message.startswith(f'{workdir}/checkpoints: no checkpoint is readable (step 4: ')
  assert '; step 2: ' in message and '\n' not in message
  assert message.endswith('pass --config.train.restart_if_unreadable=True to train from scratch')
  assert saved_steps(workdir) == [2, 4]  # left as they were
  assert not (workdir / checkpointing.UNREADABLE_DIR).exists()

  train.train_and_evaluate(tiny_config(max_steps=2, restart_if_unreadable=True), str(workdir))
  assert 'no readable checkpoint: training from scratch' in caplog.text
  assert saved_steps(workdir) == [2]
  assert sorted(p.name for p in (workdir / checkpointing.UNREADABLE_DIR).glob('*/*')) == ['2', '4']
  # Really from scratch: the same step-2 parameters as the first run's.
  for a, b in zip(
    jax.tree.leaves(restore_params(workdir, 2)), jax.tree.leaves(restore_params(four_steps, 2))
  ):
    np.testing.assert_array_equal(a, b)


# --- SIGKILL -------------------------------------------------------------------------------------

KILL_FLAGS = (
  '--config',
  'experiments/synthetic.py',
  '--config.data.synthetic_train=256',
  '--config.data.synthetic_test=32',
  '--config.train.batch_size=16',
  '--config.train.eval_batch_size=32',
  '--config.train.epochs=3',
  '--config.train.log_every_steps=1',
  '--config.train.checkpoint_every_steps=3',
  '--config.train.keep_latest=2',
)
_TRAINING = re.compile(r'step \d+/\d+ ')
_TMP = '.orbax-checkpoint-tmp'


def _env(tmp_path: pathlib.Path) -> dict:
  # A shared persistent compilation cache: the restarts skip most of the compiling.
  return dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    JAX_PLATFORMS='cpu',
    FER_JAX_CACHE=str(tmp_path / 'cache'),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )


def _run_to_end(workdir: pathlib.Path, env: dict) -> None:
  out = subprocess.run(
    [sys.executable, 'launch.py', *KILL_FLAGS, f'--workdir={workdir}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]


def _saving(checkpoints: pathlib.Path) -> bool:
  try:
    return any(_TMP in name for name in os.listdir(checkpoints))
  except FileNotFoundError:
    return False


def _start_and_kill(workdir: pathlib.Path, env: dict, during_save: bool, delay: float) -> bool:
  """Starts a run and SIGKILLs it once training is under way; returns whether a save was on."""
  proc = subprocess.Popen(
    [sys.executable, 'launch.py', *KILL_FLAGS, f'--workdir={workdir}'],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  training = threading.Event()
  tail: list[str] = []

  def read():
    for line in proc.stderr:
      tail.append(line)
      if _TRAINING.search(line):
        training.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert training.wait(180), ''.join(tail[-30:])
    checkpoints = workdir / 'checkpoints'
    deadline = time.time() + (60 if during_save else delay)
    while time.time() < deadline and proc.poll() is None:
      if during_save and _saving(checkpoints):
        break
      time.sleep(0.002)
    saving = _saving(checkpoints)
    assert proc.poll() is None, 'the run finished before it could be killed:\n' + ''.join(
      tail[-30:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return saving
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(30)
    reader.join(10)


def test_sigkill_at_random_points_then_resume_equals_a_straight_run(tmp_path):
  env = _env(tmp_path)
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  _run_to_end(straight, env)
  rng = random.Random(6)
  plan = [True, False, True, False, False]  # True: kill while a checkpoint is being saved
  rng.shuffle(plan)
  saves_hit = 0
  for during_save in plan:
    saves_hit += _start_and_kill(killed, env, during_save, delay=rng.uniform(0.0, 1.5))
    for step in saved_steps(killed):  # every checkpoint left behind reads back whole
      restore_params(killed, step)
  assert saves_hit >= 1
  _run_to_end(killed, env)
  step = saved_steps(straight)[-1]
  assert saved_steps(killed)[-1] == step == 48
  for a, b in zip(
    jax.tree.leaves(restore_params(straight, step)), jax.tree.leaves(restore_params(killed, step))
  ):
    np.testing.assert_array_equal(a, b)


def test_a_diverged_run_restores_sigterm_and_leaves_no_threads(tmp_path):
  """The error path closes what the run opened: the SIGTERM handler, orbax's checkpoint
  manager (its threads), the metric writer and grain's prefetch thread."""
  handler = signal.getsignal(signal.SIGTERM)
  before = set(threading.enumerate())
  with pytest.raises(FerJaxError, match='diverged'):
    train.train_and_evaluate(
      tiny_config(learning_rate=float('inf'), checkpoint_every_steps=1), str(tmp_path)
    )
  assert signal.getsignal(signal.SIGTERM) is handler
  deadline = time.time() + 5
  while (left := [t.name for t in set(threading.enumerate()) - before if t.is_alive()]) and (
    time.time() < deadline
  ):
    time.sleep(0.05)
  assert not left, left
