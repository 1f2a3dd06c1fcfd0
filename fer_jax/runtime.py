"""Process-level tuning that XLA:CPU training needs from glibc's allocator (and from JAX).

Why: glibc hands every freed block above its mmap threshold straight back to the OS and trims
the heap top eagerly. XLA:CPU allocates and frees the same multi-megabyte activation buffers
every step, so each step page-faults them in again: on a 2-core machine the kernel time spent
zeroing pages was more than half of the step (`time` showed sys ~ user) and the step ran at
half speed. Keeping freed memory in the process fixes it.

Two ways in, best first:
- `MALLOC_*` environment variables, read by glibc at process start: `launch.py` re-executes
  itself once with them (`tuned_environ`), unless the user set them or FER_JAX_MALLOC_TUNED.
- `mallopt` at run time, for library users who `import fer_jax` into a running process
  (`tune_malloc`; a little less effective because the thresholds are capped at 32 MiB).

The same page faults come back for blocks allocated on a thread other than the main one: a
glibc thread arena's heaps are at most 64 MiB, so a larger block is mmap'ed and unmapped again
on free, whatever the thresholds. Two sources: JAX's CPU client executes asynchronously on a
worker thread (`inline_cpu_dispatch` has it run each computation on the calling thread), and
XLA's YNNPACK fusions allocate their scratch on the intra-op worker threads (100 MiB per step
for the compact VGG at batch 128). One arena for the process (MALLOC_ARENA_MAX=1) serves every
thread from the tuned main heap.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

_ENV = {
  'MALLOC_MMAP_THRESHOLD_': str(1 << 32),
  'MALLOC_TRIM_THRESHOLD_': str(1 << 32),
  'MALLOC_TOP_PAD_': str(512 << 20),
  'MALLOC_ARENA_MAX': '1',
}
_MARK = 'FER_JAX_MALLOC_TUNED'
_ASYNC_OPT_OUT = 'FER_JAX_ASYNC_DISPATCH'
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


# JAX's accelerator plugins: with one installed (and JAX_PLATFORMS not 'cpu') JAX trains there.
_ACCELERATOR_PLUGINS = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
)


def _glibc() -> bool:
  return sys.platform.startswith('linux') and os.confstr('CS_GNU_LIBC_VERSION') is not None


def cpu_backend_expected() -> bool:
  """Whether JAX will compute on the CPU: from JAX_PLATFORMS, else from whether an accelerator
  plugin is installed. Decided without starting JAX's backends (the tweaks it gates must come
  first, and JAX has no public query for whether they have started). The malloc and dispatch
  tweaks are for XLA:CPU only: on a GPU/TPU host they would only keep host memory that the
  input pipeline and checkpoints could use."""
  platforms = [p.strip() for p in os.environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return platforms[0] == 'cpu'
  return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def tuned_environ() -> dict[str, str] | None:
  """The environment to re-execute with, or None when already tuned / not glibc / opted out."""
  if not _glibc() or _MARK in os.environ or any(k in os.environ for k in _ENV):
    return None
  if not cpu_backend_expected():
    return None
  return {**os.environ, **_ENV, _MARK: '1'}


def tune_malloc() -> bool:
  """Best-effort in-process version of the same settings; returns whether it applied them.

  A no-op off glibc, when launch.py already re-executed with the MALLOC_* variables (it sets
  FER_JAX_MALLOC_TUNED=1), when the user set any MALLOC_* variable, or with
  FER_JAX_MALLOC_TUNED=0 (opt out): the same conditions under which `tuned_environ` does nothing;
  and when JAX will not compute on the CPU.
  """
  if (
    not _glibc()
    or _MARK in os.environ
    or any(k in os.environ for k in _ENV)
    or not cpu_backend_expected()
  ):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
  libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
  libc.mallopt(_M_TOP_PAD, 256 << 20)
  libc.mallopt(_M_ARENA_MAX, 1)  # effective only if no second thread has allocated yet
  return True


def inline_cpu_dispatch() -> bool:
  """Asks XLA:CPU to run computations on the calling thread (`jax_cpu_enable_async_dispatch`
  = False); returns whether it set the option (False with FER_JAX_ASYNC_DISPATCH=1).

  Why: at 150x150 async dispatch page-faults the step's large buffers in on every step and runs
  it slower; at 48x48 the two are level (figures in benchmarks/README.md, 'Inline CPU dispatch').
  JAX reads the option when it creates its CPU client (the first computation or device query)
  and has no public way to ask whether that has happened, so call this first thing: launch.py
  does so right after parsing flags. Called later it is harmless and changes nothing.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get(_ASYNC_OPT_OUT) == '1' or not cpu_backend_expected():
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
