"""Direct convolution kernels in C++ for XLA:CPU, built on first use and called via the XLA FFI.

Why: the 'dot' lowering's im2col copies the input kh*kw times into a patch matrix and scatters
the patch gradient back; at 150x150 those copies run at DRAM speed and cost as much as a third
of the train step. These kernels (conv_kernels.cc) read the input in place: a forward conv, the
same conv with a 2x2 max-pool fused in (`conv_pool`: the conv output never leaves the cache),
and the kernel gradient, from a dense output gradient or from the pooled gradient and the
pool's winner code; the input gradient is the forward conv of the padded output gradient with
the flipped kernel. Every kernel takes `bf16`: on CPUs with AVX512-BF16 its products are those
of the operands rounded to bfloat16, summed in float32, two per instruction (vdpbf16ps).

The library is compiled with the machine's C++ compiler (`$CXX`, else `c++`/`g++`) the first time
a process asks for it, into a cache keyed by the sources, the compiler, jaxlib and the CPU
(`$FER_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/fer_jax`, else `~/.cache/fer_jax`). It is written
to a temporary name, made readable like any compiler output (0755 less the umask: a shared cache
serves every user) and renamed, so a crash never leaves a half-written library; a lock file
makes concurrent first builds into one cache compile once. Where there is no compiler, or the
build or load fails, `available()` is False (with a warning) and the 'auto' lowering uses 'dot';
`FER_JAX_NATIVE=0` turns the kernels off quietly. An explicit `FER_JAX_NATIVE_MARCH` that does
not build, or names instructions this CPU lacks, raises `NativeMarchError` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ('conv_kernels.cc', 'ffi.cc')
HEADERS = ('conv_kernels.h',)
_TARGETS = {
  'fer_jax_conv_forward': 'FerJaxConvForward',
  'fer_jax_conv_pool_forward': 'FerJaxConvPoolForward',
  'fer_jax_conv_kernel_grad': 'FerJaxConvKernelGrad',
  'fer_jax_conv_kernel_grad_pooled': 'FerJaxConvKernelGradPooled',
}
_BASE_FLAGS = ('-O3', '-std=c++20', '-shared', '-fPIC')


class NativeUnavailable(RuntimeError):
  """The C++ kernels cannot be built or loaded here (the message says why)."""


class NativeMarchError(RuntimeError):
  """`$FER_JAX_NATIVE_MARCH` names a target that does not build or that this CPU cannot run.

  Not a NativeUnavailable: an explicit request is not silently replaced by a slower build.
  """


def cache_dir() -> Path:
  if os.environ.get('FER_JAX_CACHE_DIR'):
    return Path(os.environ['FER_JAX_CACHE_DIR'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'fer_jax'


def _compiler() -> str:
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not cxx:
    raise NativeUnavailable('no C++ compiler found (set CXX or install g++)')
  if not shutil.which(cxx):
    raise NativeUnavailable(f'C++ compiler {cxx!r} (from $CXX) not found')
  return cxx


def _cpu_identity() -> str:
  """The CPU's model and feature flags: -march=native code must not move between CPUs."""
  try:
    text = Path('/proc/cpuinfo').read_text()
    lines = [l for l in text.splitlines() if l.startswith(('model name', 'flags', 'Features'))]
    return '\n'.join(dict.fromkeys(lines))
  except OSError:
    return platform.processor() or platform.machine()


def _build_key(cxx: str, flags: tuple[str, ...]) -> str:
  h = hashlib.sha256()
  for name in SOURCES + HEADERS:
    h.update((SOURCE_DIR / name).read_bytes())
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60).stdout
  import jaxlib  # pylint: disable=import-outside-toplevel

  for part in (cxx, version, ' '.join(flags), jaxlib.__version__, _cpu_identity()):
    h.update(part.encode())
  return h.hexdigest()[:16]


def _umask() -> int:
  """The process's umask (read from /proc where possible: setting it is not thread-safe)."""
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith('Umask:'):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _compile(cxx: str, flags: tuple[str, ...], out: Path) -> None:
  """Compiles SOURCES into `out` atomically (temporary file + rename)."""
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + '.', suffix='.tmp')
  os.close(fd)
  cmd = [
    cxx,
    *flags,
    '-isystem',
    jax.ffi.include_dir(),
    *(str(SOURCE_DIR / s) for s in SOURCES),
    '-o',
    tmp,
  ]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise NativeUnavailable(f'{" ".join(cmd)} failed: {proc.stderr.strip()[-2000:]}')
    # mkstemp made it 0600; other users of a shared cache must be able to load it.
    os.chmod(tmp, 0o755 & ~_umask())
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


@contextlib.contextmanager
def _build_lock(directory: Path):
  """Holds an exclusive lock on `directory`/build.lock: one process compiles, the others wait
  for its library instead of compiling the same one for minutes."""
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / 'build.lock', 'a+b') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _cached_or_compiled(cxx: str, flags: tuple[str, ...]) -> Path:
  path = cache_dir() / 'native' / _build_key(cxx, flags) / 'libfer_jax_native.so'
  if path.exists():
    return path
  with _build_lock(path.parent):
    if not path.exists():  # another process may have built it while we waited
      logging.info(
        'compiling the fer_jax C++ conv kernels for this CPU (once per machine): %s', path
      )
      _compile(cxx, flags, path)
  return path


# Predefined macros of a -march target -> the /proc/cpuinfo flag the CPU needs to run its code.
_MACRO_FLAGS = {
  '__SSE3__': 'pni',
  '__SSSE3__': 'ssse3',
  '__SSE4_1__': 'sse4_1',
  '__SSE4_2__': 'sse4_2',
  '__POPCNT__': 'popcnt',
  '__AVX__': 'avx',
  '__AVX2__': 'avx2',
  '__FMA__': 'fma',
  '__F16C__': 'f16c',
  '__BMI__': 'bmi1',
  '__BMI2__': 'bmi2',
  '__MOVBE__': 'movbe',
  '__AVX512F__': 'avx512f',
  '__AVX512CD__': 'avx512cd',
  '__AVX512BW__': 'avx512bw',
  '__AVX512DQ__': 'avx512dq',
  '__AVX512VL__': 'avx512vl',
  '__AVX512VNNI__': 'avx512_vnni',
  '__AVX512BF16__': 'avx512_bf16',
  '__AVX512FP16__': 'avx512_fp16',
  '__AVXVNNI__': 'avx_vnni',
  '__AMX_TILE__': 'amx_tile',
  '__AMX_BF16__': 'amx_bf16',
  '__AMX_INT8__': 'amx_int8',
}


def _cpu_flags() -> set[str] | None:
  """This CPU's feature flags from /proc/cpuinfo (None where there is none, e.g. not Linux)."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return None
  flags = {f for l in lines if l.startswith('flags') for f in l.split(':', 1)[1].split()}
  return flags or None


def _check_march_runs_here(cxx: str, march: str) -> None:
  """Raises NativeMarchError if -march=`march` lets the compiler use instructions this CPU
  lacks (the first convolution would die of SIGILL)."""
  proc = subprocess.run(
    [cxx, f'-march={march}', '-dM', '-E', '-x', 'c++', os.devnull],
    capture_output=True,
    text=True,
    timeout=120,
  )
  if proc.returncode != 0:
    raise NativeMarchError(
      f'FER_JAX_NATIVE_MARCH={march!r}: {cxx} rejects -march={march}: {proc.stderr.strip()[-500:]}'
    )
  cpu = _cpu_flags()
  if cpu is None:
    return
  macros = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith('#define ')}
  missing = sorted(
    flag for macro, flag in _MACRO_FLAGS.items() if macro in macros and flag not in cpu
  )
  if missing:
    raise NativeMarchError(
      f'FER_JAX_NATIVE_MARCH={march!r} needs CPU features this CPU lacks: '
      f'{", ".join(missing)} (unset it for -march=native)'
    )


def build() -> Path:
  """Path of the compiled library, compiling it if this machine has none cached yet.

  `$FER_JAX_NATIVE_MARCH` (default 'native') is the -march target: 'native' picks AVX-512 or
  AVX2 kernels for this CPU; e.g. 'haswell' forces the AVX2 ones, 'x86-64' the portable C++.
  An explicit target is built as asked or not at all (NativeMarchError); the default falls
  back to a portable build, with a warning, where the compiler has no -march=native.
  """
  cxx = _compiler()
  march = os.environ.get('FER_JAX_NATIVE_MARCH', '')
  if march:
    _check_march_runs_here(cxx, march)
    try:
      return _cached_or_compiled(cxx, _BASE_FLAGS + (f'-march={march}',))
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
      raise NativeMarchError(f'FER_JAX_NATIVE_MARCH={march!r} does not build: {e}') from e
  try:
    return _cached_or_compiled(cxx, _BASE_FLAGS + ('-march=native',))
  except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
    logging.warning(
      'fer_jax native kernels: the -march=native build failed, trying the portable one: %s',
      str(e).splitlines()[0] if str(e) else type(e).__name__,
    )
  try:
    return _cached_or_compiled(cxx, _BASE_FLAGS)
  except (NativeUnavailable, OSError, subprocess.SubprocessError) as e:
    raise NativeUnavailable(str(e)) from e


@functools.cache
def _load() -> ctypes.CDLL:
  if os.environ.get('FER_JAX_NATIVE', '1') == '0':
    raise NativeUnavailable('disabled by FER_JAX_NATIVE=0')
  path = build()
  lib = ctypes.CDLL(str(path))
  logging.info('fer_jax C++ conv kernels loaded from %s', path)
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  return lib


def ensure_loaded() -> None:
  """Builds (once per machine) and registers the kernels; raises NativeUnavailable if it can't."""
  try:
    _load()
  except (NativeUnavailable, NativeMarchError):
    raise
  except Exception as e:  # ctypes/jax errors: report them the same way
    raise NativeUnavailable(f'{type(e).__name__}: {e}') from e


@functools.cache
def unavailable_reason() -> str | None:
  """None if the kernels are usable in this process, else one line saying why not.

  A failed build or load is logged as a warning ('auto' then runs the slower 'dot' lowering);
  NativeMarchError (a bad explicit FER_JAX_NATIVE_MARCH) propagates.
  """
  try:
    ensure_loaded()
    return None
  except NativeUnavailable as e:
    reason = str(e).splitlines()[0] if str(e) else 'unknown error'
    disabled = os.environ.get('FER_JAX_NATIVE', '1') == '0'
    (logging.info if disabled else logging.warning)(
      'fer_jax native conv kernels unavailable: %s', reason
    )
    return reason


def available() -> bool:
  return unavailable_reason() is None


def isa() -> str:
  """The kernels' instruction set: 'avx512', 'avx2' or 'portable' (raises if unavailable)."""
  ensure_loaded()
  fn = _load().FerJaxNativeIsa
  fn.restype = ctypes.c_char_p
  return fn().decode()


def bf16_products() -> bool:
  """Whether `bf16=True` takes effect here: the kernels were built for a CPU with AVX512-BF16
  (raises if they are unavailable). Elsewhere the flag is ignored (float32 products)."""
  ensure_loaded()
  return bool(_load().FerJaxNativeBf16())


def conv(x: jax.Array, kernel: jax.Array, bf16: bool = False) -> jax.Array:
  """Stride-1 'VALID' convolution, NHWC x HWIO -> NHWC, float32, on the CPU backend.

  bf16: products of x and the kernel rounded to bfloat16, summed in float32 (where
  `bf16_products()` and the kernel's kw * C is even; otherwise float32 products).
  """
  ensure_loaded()
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, o), jnp.float32)
  return jax.ffi.ffi_call('fer_jax_conv_forward', out, vmap_method='sequential')(
    x.astype(jnp.float32), kernel.astype(jnp.float32), bf16=bool(bf16)
  )


def conv_pool(x: jax.Array, kernel: jax.Array, bf16: bool = False) -> tuple[jax.Array, jax.Array]:
  """The stride-1 'VALID' conv followed by a 2x2, stride-2 max-pool, float32, CPU backend.

  The conv's output must have even height and width. Returns (pooled, code): code (uint8, the
  shape of pooled) is 2*di + dj of each window's first maximum in row-major order, which is
  all the pool's gradient needs (`unpool_grad`). The conv output itself is never written: two
  rows at a time live in a per-thread scratch buffer.
  """
  ensure_loaded()
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  oh, ow = h - kh + 1, w - kw + 1
  if oh % 2 or ow % 2:
    raise ValueError(f'conv_pool: conv output {oh}x{ow} is not even (crop the input first)')
  shape = (n, oh // 2, ow // 2, o)
  return jax.ffi.ffi_call(
    'fer_jax_conv_pool_forward',
    (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8)),
    vmap_method='sequential',
  )(x.astype(jnp.float32), kernel.astype(jnp.float32), bf16=bool(bf16))


def unpool_grad(d_pooled: jax.Array, code: jax.Array) -> jax.Array:
  """(B, H, W, C) pooled gradient -> (B, 2H, 2W, C): each window's winner (`conv_pool`'s code)
  takes the gradient, the other three get zero (what XLA's max-pool gradient does)."""
  b, h, w, c = d_pooled.shape
  position = (2 * jnp.arange(2)[:, None] + jnp.arange(2)[None, :]).astype(code.dtype)
  hit = code[:, :, None, :, None, :] == position[None, None, :, None, :, None]
  return jnp.where(hit, d_pooled[:, :, None, :, None, :], 0).reshape(b, 2 * h, 2 * w, c)


def conv_kernel_grad(
  x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], bf16: bool = False
) -> jax.Array:
  """d(conv(x, k))/dk contracted with dy: (kh, kw, C, O), float32.

  bf16: products of x and dy rounded to bfloat16, summed in float32 (where `bf16_products()`).
  """
  ensure_loaded()
  kh, kw = kernel_hw
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call('fer_jax_conv_kernel_grad', out, vmap_method='sequential')(
    x.astype(jnp.float32), dy.astype(jnp.float32), bf16=bool(bf16)
  )


def conv_kernel_grad_pooled(
  x: jax.Array,
  d_pooled: jax.Array,
  code: jax.Array,
  kernel_hw: tuple[int, int],
  bf16: bool = False,
) -> jax.Array:
  """`conv_kernel_grad` with dy = unpool_grad(d_pooled, code), without materialising dy.

  For a conv followed by `conv_pool`'s max-pool: the kernel builds each chunk of dy in cache
  from the pooled gradient and the winner code (a quarter of dy's floats plus one byte each).
  """
  ensure_loaded()
  kh, kw = kernel_hw
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], d_pooled.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call('fer_jax_conv_kernel_grad_pooled', out, vmap_method='sequential')(
    x.astype(jnp.float32), d_pooled.astype(jnp.float32), code.astype(jnp.uint8), bf16=bool(bf16)
  )


def conv_input_grad(
  dy: jax.Array, kernel: jax.Array, pad: tuple[int, int] = (0, 0), bf16: bool = False
) -> jax.Array:
  """d(conv(x, k))/dx contracted with dy: the correlation of dy with the flipped kernel.

  `pad` is the zero padding (before, after) the forward conv put around x on both spatial
  axes: the gradient is then computed for x itself, not for its padded border, which would
  be thrown away (at 5x5 a 'SAME' 3x3 border is half of the padded input's outputs).
  """
  kh, kw, _, _ = kernel.shape
  before, after = pad
  if not (0 <= before < kh and 0 <= after < kh and before < kw and after < kw):
    raise ValueError(f'conv_input_grad: padding {pad} must be below the kernel size {kh}x{kw}')
  padded = jnp.pad(
    dy, ((0, 0), (kh - 1 - before, kh - 1 - after), (kw - 1 - before, kw - 1 - after), (0, 0))
  )
  return conv(padded, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), bf16)
