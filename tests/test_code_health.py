"""Code health: no private imports across modules or from JAX, the CPU plumbing does what its
comments say (malloc tuning, inline dispatch, when the C++ kernels are built)."""

import ast
import os
import pathlib
import resource
import subprocess
import sys

import jax
import pytest

from fer_jax import models, native, runtime

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'fer_jax'


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      yield node.module or '', [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, []


def test_no_module_imports_private_names_or_private_jax():
  bad = []
  for path in sorted(PACKAGE.rglob('*.py')):
    for module, names in _imports(path):
      if module.startswith(('jax._src', 'jaxlib.')):
        bad.append(f'{path.name}: {module}')
      if module.startswith('fer_jax') and any(n.startswith('_') for n in names):
        bad.append(f'{path.name}: from {module} import {names}')
    # `module._name` for any fer_jax module (files, packages) other than this file's own.
    modules = {p.stem for p in PACKAGE.rglob('*.py')} | {
      p.name for p in PACKAGE.iterdir() if p.is_dir()
    }
    for node in ast.walk(ast.parse(path.read_text())):
      if (
        isinstance(node, ast.Attribute)
        and node.attr.startswith('_')
        and not node.attr.startswith('__')
        and isinstance(node.value, ast.Name)
        and node.value.id in modules - {path.stem}
      ):
        bad.append(f'{path.name}: {node.value.id}.{node.attr}')
  assert not bad, bad


@pytest.mark.parametrize(
  'environ, applies',
  [
    ({}, True),
    ({'FER_JAX_MALLOC_TUNED': '1'}, False),  # launch.py re-executed with MALLOC_* already
    ({'FER_JAX_MALLOC_TUNED': '0'}, False),  # opted out
    ({'MALLOC_TOP_PAD_': '0'}, False),  # the user's own settings win
  ],
)
def test_tune_malloc_is_a_no_op_after_launch_py(monkeypatch, environ, applies):
  for key in (
    'FER_JAX_MALLOC_TUNED',
    'MALLOC_MMAP_THRESHOLD_',
    'MALLOC_TRIM_THRESHOLD_',
    'MALLOC_TOP_PAD_',
    'MALLOC_ARENA_MAX',
  ):
    monkeypatch.delenv(key, raising=False)
  for key, value in environ.items():
    monkeypatch.setenv(key, value)
  calls = []

  class FakeLibc:
    def mallopt(self, option, value):
      calls.append((option, value))

  monkeypatch.setattr(runtime, '_glibc', lambda: True)
  monkeypatch.setattr(runtime.ctypes, 'CDLL', lambda name: FakeLibc())
  assert runtime.tune_malloc() is applies
  assert bool(calls) is applies
  # launch.py's re-execution marks the environment that makes tune_malloc a no-op.
  if not environ:
    assert runtime.tuned_environ()['FER_JAX_MALLOC_TUNED'] == '1'
    monkeypatch.setenv('FER_JAX_MALLOC_TUNED', runtime.tuned_environ()['FER_JAX_MALLOC_TUNED'])
    assert runtime.tune_malloc() is False


# A worker thread allocates, touches and frees a 100 MiB block three times (what XLA's YNNPACK
# fusions do each step on the intra-op threads) and prints the page faults of each round.
_WORKER_THREAD_BLOCKS = """
import ctypes, resource, threading
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n, faults = 100 << 20, []
def work():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(*faults)
"""


@pytest.mark.skipif(not runtime._glibc(), reason='glibc malloc only')
def test_launch_py_environment_keeps_worker_threads_large_blocks(monkeypatch):
  """Under launch.py's MALLOC_* environment a large block freed on a worker thread stays in the
  process, so allocating it again faults no pages in; under glibc's defaults every round
  faults all its pages (25,600 of 4 KiB) in again."""
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  for key in ('FER_JAX_MALLOC_TUNED', *runtime._ENV):
    monkeypatch.delenv(key, raising=False)
  pages = (100 << 20) // resource.getpagesize()

  def rounds(env):
    out = subprocess.run(
      [sys.executable, '-c', _WORKER_THREAD_BLOCKS],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    return [int(f) for f in out.stdout.split()]

  default = rounds(dict(os.environ))
  assert all(f > pages // 2 for f in default), default
  tuned = rounds(runtime.tuned_environ())
  assert tuned[0] > pages // 2 and max(tuned[1:]) < pages // 20, tuned


def test_inline_cpu_dispatch_sets_the_public_option(monkeypatch):
  before = jax.config.read('jax_cpu_enable_async_dispatch')
  try:
    monkeypatch.setenv('FER_JAX_ASYNC_DISPATCH', '1')
    assert runtime.inline_cpu_dispatch() is False
    assert jax.config.read('jax_cpu_enable_async_dispatch') == before
    monkeypatch.delenv('FER_JAX_ASYNC_DISPATCH')
    assert runtime.inline_cpu_dispatch() is True
    assert jax.config.read('jax_cpu_enable_async_dispatch') is False
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', before)


def test_the_cpu_kernels_are_prepared_when_the_model_is_built():
  from experiments import base

  native.unavailable_reason.cache_clear()
  models.get_model(base.get_config().model, 7)  # lowering 'auto' on the CPU
  assert native.unavailable_reason.cache_info().currsize == 1  # decided here, not at tracing


def test_a_missing_declared_dependency_fails_in_ci_and_skips_elsewhere(monkeypatch):
  from tests.conftest import require

  monkeypatch.setenv('CI', '1')
  with pytest.raises(pytest.fail.Exception, match='declared dependency'):
    require('fer_jax_no_such_module')
  monkeypatch.delenv('CI')
  with pytest.raises(pytest.skip.Exception):
    require('fer_jax_no_such_module')
  assert require('PIL.Image').open  # a present one is returned
