"""The C++ direct-convolution kernels (fer_jax.native) against lax.conv, and their build."""

import os
import pathlib
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import native

needs_native = pytest.mark.skipif(
  not native.available(), reason=f'native kernels unavailable: {native.unavailable_reason()}'
)


def _lax_conv(x, k):
  return jax.lax.conv_general_dilated(
    x,
    k,
    (1, 1),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision=jax.lax.Precision.HIGHEST,
  )


def _assert_close(actual, expected, rel=1e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(float(np.abs(expected).max()), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


def test_kernels_build_wherever_there_is_a_compiler():
  """CI has g++: there the fast path must really be built, not silently skipped."""
  if os.environ.get('FER_JAX_NATIVE') == '0' or not (
    os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  ):
    pytest.skip('no C++ compiler here')
  assert native.available(), native.unavailable_reason()


# (x shape NHWC, kernel HWIO): the model's shapes, then awkward ones for the kernels' remainders.
SHAPES = [
  ((2, 48, 48, 1), (3, 3, 1, 32)),
  ((2, 22, 22, 32), (3, 3, 32, 64)),
  ((1, 74, 74, 32), (3, 3, 32, 64)),
  ((3, 9, 11, 3), (3, 3, 3, 5)),
  ((1, 7, 13, 17), (2, 5, 17, 24)),
  ((2, 5, 6, 8), (1, 1, 8, 9)),
  ((1, 3, 3, 2), (3, 3, 2, 40)),
  ((4, 10, 31, 7), (3, 3, 7, 16)),
  # Channel counts that leave a partial last vector in every AVX2 / AVX-512 tile width.
  ((2, 6, 7, 5), (3, 3, 5, 56)),
  ((1, 9, 9, 16), (3, 3, 16, 20)),
  ((2, 12, 12, 1), (3, 3, 1, 44)),
]


@needs_native
@pytest.mark.parametrize('x_shape, k_shape', SHAPES)
def test_conv_and_its_gradients_match_lax(x_shape, k_shape):
  kx, kk, kd = jax.random.split(jax.random.key(sum(x_shape) + sum(k_shape)), 3)
  x = jax.random.normal(kx, x_shape)
  k = jax.random.normal(kk, k_shape)
  y_ref, vjp = jax.vjp(_lax_conv, x, k)
  dy = jax.random.normal(kd, y_ref.shape)
  dx_ref, dk_ref = vjp(dy)

  y = jax.jit(native.conv)(x, k)
  dk = jax.jit(native.conv_kernel_grad, static_argnums=2)(x, dy, k_shape[:2])
  dx = jax.jit(native.conv_input_grad)(dy, k)
  _assert_close(y, y_ref)
  _assert_close(dk, dk_ref)
  _assert_close(dx, dx_ref)
  # Bitwise repeatable (the kernels split work over threads without changing sum order).
  np.testing.assert_array_equal(jax.jit(native.conv)(x, k), y)
  np.testing.assert_array_equal(
    jax.jit(native.conv_kernel_grad, static_argnums=2)(x, dy, k_shape[:2]), dk
  )


@needs_native
@pytest.mark.parametrize(
  'x_shape, k_shape, pad',
  [
    ((2, 5, 5, 16), (3, 3, 16, 24), (1, 1)),  # 'SAME' 3x3 on the smallest VGG block
    ((1, 11, 9, 8), (3, 3, 8, 20), (0, 2)),
    ((2, 6, 7, 3), (5, 5, 3, 9), (2, 2)),
    ((1, 4, 6, 2), (2, 2, 2, 5), (1, 0)),
  ],
)
def test_input_grad_of_a_padded_conv_is_computed_for_the_unpadded_input(x_shape, k_shape, pad):
  """conv_input_grad(dy, k, pad) is the gradient for x of conv(pad(x), k): the padded border's
  outputs are not computed, and what is left equals lax's gradient."""
  kx, kk, kd = jax.random.split(jax.random.key(sum(x_shape) + sum(pad)), 3)
  x = jax.random.normal(kx, x_shape)
  k = jax.random.normal(kk, k_shape)
  padded = lambda v: jnp.pad(v, ((0, 0), pad, pad, (0, 0)))
  y_ref, vjp = jax.vjp(lambda v: _lax_conv(padded(v), k), x)
  dy = jax.random.normal(kd, y_ref.shape)
  dx = jax.jit(native.conv_input_grad, static_argnums=2)(dy, k, pad)
  _assert_close(dx, vjp(dy)[0])
  with pytest.raises(ValueError, match='below the kernel size'):
    native.conv_input_grad(dy, k, (k_shape[0], 0))


# Conv outputs of even size (the fused pool needs it), with remainders in every tile width.
POOL_SHAPES = [
  ((2, 48, 48, 1), (3, 3, 1, 32)),
  ((2, 22, 22, 32), (3, 3, 32, 64)),
  ((1, 11, 9, 3), (2, 4, 3, 20)),
  ((3, 6, 6, 5), (3, 3, 5, 56)),
  ((1, 4, 4, 2), (3, 3, 2, 44)),
]


@needs_native
@pytest.mark.parametrize('x_shape, k_shape', POOL_SHAPES)
def test_conv_pool_matches_conv_then_max_pool(x_shape, k_shape):
  import flax.linen as nn

  kx, kk, kd = jax.random.split(jax.random.key(sum(x_shape) + 7 * sum(k_shape)), 3)
  x = jax.random.normal(kx, x_shape)
  k = jax.random.normal(kk, k_shape)
  pool = lambda y: nn.max_pool(y, (2, 2), (2, 2), 'VALID')
  ref, vjp = jax.vjp(lambda x: pool(_lax_conv(x, k)), x)
  pooled, code = jax.jit(native.conv_pool)(x, k)
  assert code.dtype == jnp.uint8 and int(code.max()) <= 3
  _assert_close(pooled, ref)
  # The code routes the gradient where XLA's max-pool gradient sends it.
  d_pooled = jax.random.normal(kd, ref.shape)
  y = _lax_conv(x, k)
  (dy_ref,) = jax.vjp(pool, y)[1](d_pooled)
  np.testing.assert_array_equal(native.unpool_grad(d_pooled, code), dy_ref)
  np.testing.assert_array_equal(jax.jit(native.conv_pool)(x, k)[1], code)  # deterministic
  # The kernel gradient from (d_pooled, code) equals the one from the expanded dy.
  dk = jax.jit(native.conv_kernel_grad_pooled, static_argnums=3)(x, d_pooled, code, k_shape[:2])
  _assert_close(dk, jax.vjp(lambda k: _lax_conv(x, k), k)[1](dy_ref)[0])
  np.testing.assert_allclose(dk, native.conv_kernel_grad(x, dy_ref, k_shape[:2]), rtol=0, atol=0)


@needs_native
def test_conv_pool_ties_pick_the_first_maximum_like_max_pool():
  import flax.linen as nn

  x = jnp.ones((1, 6, 6, 1))  # a constant image: every window is one big tie
  k = jnp.ones((3, 3, 1, 4))
  pooled, code = native.conv_pool(x, k)
  np.testing.assert_array_equal(pooled, 9.0)
  np.testing.assert_array_equal(code, 0)
  d = jnp.arange(1.0, 1.0 + pooled.size).reshape(pooled.shape)
  (dy_ref,) = jax.vjp(lambda y: nn.max_pool(y, (2, 2), (2, 2), 'VALID'), _lax_conv(x, k))[1](d)
  np.testing.assert_array_equal(native.unpool_grad(d, code), dy_ref)


@needs_native
@pytest.mark.parametrize('position', [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_conv_pool_propagates_a_nan_anywhere_in_the_window(position):
  """A NaN conv output is the window's pooled value (as through nn.max_pool), so a divergence
  shows in the loss of the step where it happens; the code points at it (the first NaN)."""
  import flax.linen as nn

  x = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6, 1)
  x[1, 2 + position[0], 4 + position[1], 0] = np.nan
  k = jnp.ones((1, 1, 1, 20))  # every output channel is x: partial vectors in every tile width
  pooled, code = jax.jit(native.conv_pool)(jnp.asarray(x), k)
  ref = nn.max_pool(_lax_conv(jnp.asarray(x), k), (2, 2), (2, 2), 'VALID')
  np.testing.assert_array_equal(np.isnan(pooled), np.isnan(ref))
  assert np.isnan(pooled).sum() == 20 and np.isnan(pooled[1, 1, 2]).all()
  np.testing.assert_array_equal(code[1, 1, 2], 2 * position[0] + position[1])
  np.testing.assert_array_equal(np.where(np.isnan(ref), 0, pooled), np.where(np.isnan(ref), 0, ref))


@needs_native
@pytest.mark.parametrize('position', [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_native_conv_relu_pool_layer_keeps_a_nan_like_the_xla_layer(position):
  """The forward pass and every gradient of ConvReluPool have NaNs exactly where the 'xla'
  layer's have them."""
  from fer_jax.models import layers

  x = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32)
  x[0, 4 + position[0], 4 + position[1], 1] = np.nan
  results = []
  for lowering in ('native', 'xla'):
    layer = layers.ConvReluPool(20, 3, lowering=lowering)
    params = layer.init(jax.random.key(0), x)
    out = layer.apply(params, x)
    grads = jax.grad(lambda p, v: jnp.sum(layer.apply(p, v)), argnums=(0, 1))(params, x)
    results.append([np.asarray(out)] + [np.asarray(g) for g in jax.tree.leaves(grads)])
  assert np.isnan(results[1][0]).any()
  # Only the NaN patterns: in a window holding a NaN, XLA's pool gradient goes to whichever
  # element its >= chain against the NaN ends on, the native one to the NaN (killed by the relu).
  for got, want in zip(*results):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@needs_native
def test_conv_pool_rejects_an_odd_conv_output():
  with pytest.raises(ValueError, match='not even'):
    native.conv_pool(jnp.ones((1, 6, 7, 1)), jnp.ones((3, 3, 1, 4)))


@needs_native
def test_conv_under_vmap():
  x = jax.random.normal(jax.random.key(0), (3, 2, 12, 12, 4))
  k = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  _assert_close(
    jax.vmap(native.conv, in_axes=(0, None))(x, k), jax.vmap(_lax_conv, in_axes=(0, None))(x, k)
  )


def _rand(shape, seed) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _bf16(a) -> np.ndarray:
  """a rounded to bfloat16 (to nearest even), as float64."""
  return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def _conv64(x, k):
  """The 'VALID' conv in float64 (x (N, H, W, C), k (kh, kw, C, O))."""
  kh, kw = k.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return sum(
    np.einsum('nhwc,co->nhwo', x[:, i : i + oh, j : j + ow], k[i, j])
    for i in range(kh)
    for j in range(kw)
  )


def _kernel_grad64(x, dy, kh, kw):
  oh, ow = dy.shape[1:3]
  return np.stack(
    [
      np.stack([np.einsum('nhwc,nhwo->co', x[:, i : i + oh, j : j + ow], dy) for j in range(kw)])
      for i in range(kh)
    ]
  )


@needs_native
@pytest.mark.parametrize('x_shape, k_shape', SHAPES)
def test_bf16_products_are_those_of_the_rounded_operands(x_shape, k_shape):
  """bf16=True: the forward conv (where kw * C is even) and the kernel gradient (always) equal
  the float64 sums of the products of the bfloat16-rounded operands, to float32 summation
  error, and differ from the float32 products by more than that. Where the CPU has no
  AVX512-BF16 the flag changes nothing."""
  x = _rand(x_shape, 0)
  k = _rand(k_shape, 1)
  kh, kw, c, _ = k_shape
  y32 = native.conv(x, k)
  dy = _rand(y32.shape, 2)
  y, dk = native.conv(x, k, bf16=True), native.conv_kernel_grad(x, dy, (kh, kw), bf16=True)
  dk32 = native.conv_kernel_grad(x, dy, (kh, kw))
  if not native.bf16_products():
    np.testing.assert_array_equal(y, y32)
    np.testing.assert_array_equal(dk, dk32)
    return
  if kw * c % 2:  # odd reductions stay float32
    np.testing.assert_array_equal(y, y32)
  else:
    want = _conv64(_bf16(x), _bf16(k))
    _assert_close(y, want)
    assert not np.allclose(y32, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  want = _kernel_grad64(_bf16(x), _bf16(dy), kh, kw)
  _assert_close(dk, want)
  assert not np.allclose(dk32, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize('x_shape, k_shape', POOL_SHAPES)
def test_bf16_fused_pool_and_its_kernel_gradient(x_shape, k_shape):
  """The fused conv + pool with bf16 pools the bf16 conv, and its pooled kernel gradient equals
  the dense bf16 kernel gradient of the unpooled dy."""
  x, k = _rand(x_shape, 3), _rand(k_shape, 4)
  kh, kw = k_shape[:2]
  pooled, code = native.conv_pool(x, k, bf16=True)
  y = native.conv(x, k, bf16=True)
  n, oh, ow, o = y.shape
  windows = np.asarray(y).reshape(n, oh // 2, 2, ow // 2, 2, o).max(axis=(2, 4))
  np.testing.assert_array_equal(pooled, windows)
  d_pooled = _rand(pooled.shape, 5)
  dense = native.conv_kernel_grad(x, native.unpool_grad(d_pooled, code), (kh, kw), bf16=True)
  _assert_close(native.conv_kernel_grad_pooled(x, d_pooled, code, (kh, kw), bf16=True), dense)


def _cpu_flags() -> set[str]:
  try:
    lines = open('/proc/cpuinfo').read().splitlines()
  except OSError:
    return set()
  return {f for l in lines if l.startswith('flags') for f in l.split(':', 1)[1].split()}


_ISA_CHECK = """
import sys
import pytest
from fer_jax import native
print('isa:', native.isa())
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1], '-k', 'match_lax or conv_pool']))
"""


@pytest.fixture(scope='module')
def portable_build(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(cache directory, library) of one real build of the portable kernels (-march=x86-64;
  the default target off x86), made in this process: the build-cache test checks it and the
  portable instruction-set test's subprocess loads it, one compile for both."""
  directory = tmp_path_factory.mktemp('portable_build')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('FER_JAX_CACHE_DIR', str(directory))
    if platform.machine() in ('x86_64', 'AMD64'):
      mp.setenv('FER_JAX_NATIVE_MARCH', 'x86-64')
    else:
      mp.delenv('FER_JAX_NATIVE_MARCH', raising=False)
    return directory, native.build()


@needs_native
@pytest.mark.parametrize('march, isa', [('haswell', 'avx2'), ('x86-64', 'portable')])
def test_every_instruction_set_matches_lax(request, tmp_path, march, isa):
  """The AVX-512, AVX2 and portable kernels are separate code: check the ones this CPU runs
  besides its own (-march=native) build, which the tests above check in this process."""
  if platform.machine() not in ('x86_64', 'AMD64'):
    pytest.skip('x86 targets')
  if isa == 'avx2' and not all(f in _cpu_flags() for f in ('avx2', 'fma')):
    pytest.skip('this CPU has no AVX2/FMA')
  if native.isa() == isa:
    pytest.skip(f"this CPU's own build has the {isa} kernels: the tests above check them")
  cache = request.getfixturevalue('portable_build')[0] if isa == 'portable' else tmp_path
  env = {
    **os.environ,
    'FER_JAX_CACHE_DIR': str(cache),
    'FER_JAX_NATIVE_MARCH': march,
    'JAX_PLATFORMS': 'cpu',
    # The session's compilation cache serves the subprocess (its pytest loads conftest.py, so it
    # compiles as this process does) the programs the tests above compiled: an executable calls
    # its kernels by FFI target name, looked up when it is loaded, so a cached one runs this
    # build's kernels, the ones the subprocess registered.
  }
  proc = subprocess.run(
    [sys.executable, '-c', _ISA_CHECK, __file__],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert f'isa: {isa}' in proc.stdout
  assert f'{len(SHAPES) + len(POOL_SHAPES) + 6} passed' in proc.stdout


_NO_NATIVE = """
import jax
from fer_jax import models, native
from fer_jax.errors import ConfigError
from fer_jax.models import layers
assert not native.available()
print('reason:', native.unavailable_reason())
assert layers.resolve_lowering('auto') == 'dot'
try:
  models.get_model({'name': 'seed_cnn', 'lowering': 'native'}, 7)
except ConfigError as e:
  print('config error:', e)
else:
  raise SystemExit('no ConfigError')
"""


@pytest.mark.parametrize(
  'env, reason',
  [
    ({'FER_JAX_NATIVE': '0'}, 'FER_JAX_NATIVE=0'),
    ({'CXX': '/nonexistent/c++'}, '/nonexistent/c++'),
  ],
)
def test_without_the_kernels_auto_falls_back_to_dot(tmp_path, env, reason):
  env = {**os.environ, 'FER_JAX_CACHE_DIR': str(tmp_path), 'JAX_PLATFORMS': 'cpu', **env}
  proc = subprocess.run(
    [sys.executable, '-c', _NO_NATIVE], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert reason in proc.stdout
  assert "model.lowering='native' needs the C++ conv kernels" in proc.stdout
  assert not list(tmp_path.rglob('*.so'))  # nothing half-built left behind
  assert not list(tmp_path.rglob('*.tmp'))
  # A failed build is a warning (printed without any logging setup); turning it off is not.
  warned = 'fer_jax native conv kernels unavailable' in proc.stderr
  assert warned == ('CXX' in env), proc.stderr[-3000:]


# A stand-in compiler: logs each compile to $FAKE_CXX_LOG, takes a second, writes the output
# (or fails when $FAKE_CXX_FAIL is set); --version and -dM -E go to the real one.
_FAKE_CXX = """#!/bin/sh
for a in "$@"; do case "$a" in --version|-dM) exec c++ "$@";; esac; done
echo "$@" >> "$FAKE_CXX_LOG"
sleep 1
if [ -n "$FAKE_CXX_FAIL" ]; then echo 'fake: no such target' >&2; exit 1; fi
while [ $# -gt 1 ]; do if [ "$1" = -o ]; then echo fake > "$2"; fi; shift; done
"""


def _fake_cxx(tmp_path, **env):
  if not shutil.which('c++'):
    pytest.skip('needs c++ for --version')
  cxx = tmp_path / 'fake-c++'
  cxx.write_text(_FAKE_CXX)
  cxx.chmod(0o755)
  log = tmp_path / 'compiles.log'
  log.touch()
  return log, {
    **os.environ,
    'CXX': str(cxx),
    'FAKE_CXX_LOG': str(log),
    'JAX_PLATFORMS': 'cpu',
    'FER_JAX_CACHE_DIR': str(tmp_path / 'cache'),
    **env,
  }


_BUILD = 'from fer_jax import native; print("built:", native.build())'


def test_concurrent_first_builds_compile_once(tmp_path):
  log, env = _fake_cxx(tmp_path)
  env.pop('FER_JAX_NATIVE_MARCH', None)
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _BUILD],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  paths = {line for out, _ in outs for line in out.splitlines() if line.startswith('built:')}
  assert len(paths) == 1  # the same library...
  assert len(log.read_text().splitlines()) == 1  # ...compiled once


def test_the_built_library_is_readable_by_other_users(tmp_path, monkeypatch):
  log, env = _fake_cxx(tmp_path)
  for k in ('CXX', 'FAKE_CXX_LOG', 'FER_JAX_CACHE_DIR'):
    monkeypatch.setenv(k, env[k])
  monkeypatch.delenv('FER_JAX_NATIVE_MARCH', raising=False)
  old = os.umask(0o022)
  try:
    path = native.build()
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == 0o755  # not mkstemp's 0600
  assert len(log.read_text().splitlines()) == 1


def test_an_explicit_march_that_does_not_build_is_an_error(tmp_path):
  log, env = _fake_cxx(tmp_path, FAKE_CXX_FAIL='1', FER_JAX_NATIVE_MARCH='x86-64')
  proc = subprocess.run(
    [sys.executable, '-c', _BUILD], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode != 0
  assert "NativeMarchError: FER_JAX_NATIVE_MARCH='x86-64' does not build" in proc.stderr
  assert 'fake: no such target' in proc.stderr
  compiles = log.read_text().splitlines()
  assert len(compiles) == 1 and '-march=x86-64' in compiles[0]  # no silent portable build


def test_an_explicit_march_this_cpu_cannot_run_is_an_error(tmp_path):
  flags = _cpu_flags()
  if platform.machine() not in ('x86_64', 'AMD64') or not flags or not shutil.which('c++'):
    pytest.skip('x86 Linux with c++')
  if 'avx512f' not in flags:
    march, missing = 'skylake-avx512', 'avx512f'
  elif 'amx_tile' not in flags:
    march, missing = 'sapphirerapids', 'amx_tile'
  else:
    pytest.skip('this CPU runs every target named here')
  log, env = _fake_cxx(tmp_path, FER_JAX_NATIVE_MARCH=march)
  code = 'from fer_jax import native; print(native.available())'
  proc = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode != 0  # not a quiet fallback, not a SIGILL (returncode < 0)
  assert proc.returncode > 0 and 'NativeMarchError' in proc.stderr
  assert 'needs CPU features this CPU lacks: ' in proc.stderr and missing in proc.stderr
  assert not log.read_text()  # refused before compiling


_OUT_OF_MEMORY = """
import resource
import jax
import jax.numpy as jnp
from fer_jax import native
native.ensure_loaded()
o = 1 << 24  # the fused pool's per-thread scratch (2 conv rows, 512 MB) will not fit
x, k = jnp.ones((1, 2, 4, 1)), jnp.ones((1, 1, 1, o))
jax.block_until_ready(native.conv_pool(x, jnp.ones((1, 1, 1, 8))))
vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
try:
  jax.block_until_ready(native.conv_pool(x, k))
except Exception as e:
  print('error:', e)
"""


@needs_native
def test_a_cpp_exception_becomes_an_error_of_the_call():
  if not os.path.exists('/proc/self/status'):
    pytest.skip('reads VmSize from /proc')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
    [sys.executable, '-c', _OUT_OF_MEMORY], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RESOURCE_EXHAUSTED: conv_pool: out of memory for the kernel's scratch" in proc.stdout


@needs_native
def test_native_build_uses_this_cpus_widest_vectors():
  flags = _cpu_flags()
  expected = 'avx512' if 'avx512f' in flags else 'avx2' if {'avx2', 'fma'} <= flags else None
  if expected is None or os.environ.get('FER_JAX_NATIVE_MARCH', 'native') != 'native':
    pytest.skip('not an AVX2/AVX-512 CPU with the default build')
  assert native.isa() == expected


@needs_native
def test_build_is_cached_and_atomic(portable_build, monkeypatch):
  directory, path = portable_build  # built by a real compiler into an empty cache
  assert path.is_relative_to(directory) and path.stat().st_size > 0
  monkeypatch.setenv('FER_JAX_CACHE_DIR', str(directory))
  if platform.machine() in ('x86_64', 'AMD64'):
    monkeypatch.setenv('FER_JAX_NATIVE_MARCH', 'x86-64')
  else:
    monkeypatch.delenv('FER_JAX_NATIVE_MARCH', raising=False)
  mtime = path.stat().st_mtime_ns
  assert native.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
  assert not list(directory.rglob('*.tmp'))


@needs_native
def test_the_kernels_reject_inconsistent_shapes_with_a_clear_error():
  x = jnp.ones((1, 6, 6, 2))
  with pytest.raises(Exception, match='conv kernel grad: wrong shape of dy'):
    jax.block_until_ready(native.conv_kernel_grad(x, jnp.ones((1, 3, 4, 8)), (3, 3)))
  with pytest.raises(Exception, match='pooled conv kernel grad: wrong shape of d_pooled'):
    jax.block_until_ready(
      native.conv_kernel_grad_pooled(
        x, jnp.ones((1, 1, 2, 8)), jnp.zeros((1, 2, 2, 8), jnp.uint8), (3, 3)
      )
    )


def test_kernels_are_memory_safe_and_exact_under_address_sanitizer(tmp_path):
  """The kernels' own C++ (this CPU's -march=native code paths), built with AddressSanitizer
  and UBSan into tests/native_sanitizer_main.cc's driver: random shapes through every entry
  point, on one thread and on three, in exact-size buffers, against a naive reference. A read or
  write past a buffer may never crash a training run, yet corrupt it; this catches it."""
  try:
    cxx = native._compiler()  # the one the kernels are built with
  except native.NativeUnavailable as e:
    pytest.skip(str(e))
  source = pathlib.Path(native.__file__).parent
  binary = tmp_path / 'sanitized'
  build = subprocess.run(
    [
      cxx,
      '-O1',
      '-g',
      '-std=c++20',
      '-march=native',
      '-fno-omit-frame-pointer',
      '-fsanitize=address,undefined',
      '-fno-sanitize-recover=undefined',
      f'-I{source}',
      str(source / 'conv_kernels.cc'),
      str(pathlib.Path(__file__).with_name('native_sanitizer_main.cc')),
      '-o',
      str(binary),
      '-lpthread',
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  if build.returncode and 'cannot find' in build.stderr and 'san' in build.stderr:
    pytest.skip(f'{cxx} has no sanitizer runtime: {build.stderr.strip()[-200:]}')
  assert build.returncode == 0, build.stderr[-2000:]
  run = subprocess.run(
    [str(binary), '40', '1'],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, 'ASAN_OPTIONS': 'detect_leaks=0', 'UBSAN_OPTIONS': 'print_stacktrace=1'},
  )
  assert run.returncode == 0 and run.stdout.strip() == 'ok 40', (run.stdout + run.stderr)[-3000:]
