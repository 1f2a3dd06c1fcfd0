"""The native C++ conv kernels against XLA's im2col + dot, side by side, at the train step's shapes.

`--against bf16` times the kernels' float32 products against their bfloat16 ones
(`conv_precision='bfloat16'`; the same as float32 on a CPU without AVX512-BF16) instead.

Each row is one call the train step makes per gradient chunk (auto chunk: 32 images at 48x48,
16 at 150x150; the 'v' rows: the compact VGG's whole batch of 64); both sides run as jitted
JAX functions, so the native side includes the XLA FFI call. Blocks of back-to-back calls
alternate between the two sides and the first call of each block is dropped (XLA's pool
threads spin for a while after an op; an idle core clocks down).

  python benchmarks/conv_kernels.py [--reps 4] [--only c2f48,c2dk150] [--against bf16]

Prints a markdown table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

# name: (op, x shape NHWC, kernel HWIO). 'f': forward conv; 'dx': input gradient (a forward
# conv of the padded output gradient, so it is timed as one); 'dk': kernel gradient.
SHAPES = {
  'c1f48': ('f', (32, 48, 48, 1), (3, 3, 1, 32)),
  'c1dk48': ('dk', (32, 48, 48, 1), (3, 3, 1, 32)),
  'c2f48': ('f', (32, 22, 22, 32), (3, 3, 32, 64)),
  'c2dx48': ('f', (32, 24, 24, 64), (3, 3, 64, 32)),
  'c2dk48': ('dk', (32, 22, 22, 32), (3, 3, 32, 64)),
  'c1f150': ('f', (16, 150, 150, 1), (3, 3, 1, 32)),
  'c1dk150': ('dk', (16, 150, 150, 1), (3, 3, 1, 32)),
  'c2f150': ('f', (16, 74, 74, 32), (3, 3, 32, 64)),
  'c2dx150': ('f', (16, 76, 76, 64), (3, 3, 64, 32)),
  'c2dk150': ('dk', (16, 74, 74, 32), (3, 3, 32, 64)),
  # experiments/cpu_budget.py's compact VGG (batch 64, 'SAME' 3x3 on 44x44 crops): the second
  # conv of blocks 1, 3 and 4. Its input gradient is a forward conv of the output gradient
  # padded by 1 (the padded border's gradient is not computed), so with c == o the 'f' row
  # times it too.
  'v1f44': ('f', (64, 46, 46, 32), (3, 3, 32, 32)),
  'v1dk44': ('dk', (64, 46, 46, 32), (3, 3, 32, 32)),
  'v3f11': ('f', (64, 13, 13, 128), (3, 3, 128, 128)),
  'v3dk11': ('dk', (64, 13, 13, 128), (3, 3, 128, 128)),
  'v4f5': ('f', (64, 7, 7, 256), (3, 3, 256, 256)),
  'v4dk5': ('dk', (64, 7, 7, 256), (3, 3, 256, 256)),
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--reps', type=int, default=4, help='alternating blocks per side')
  p.add_argument('--only', default='', help='comma-separated row names')
  p.add_argument(
    '--against',
    choices=('xla', 'bf16'),
    default='xla',
    help="the other side: 'xla' im2col + dot, or 'bf16' the kernels' bfloat16 products",
  )
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from fer_jax import native
  from fer_jax.models.layers import im2col_patches

  native.ensure_loaded()
  names = args.only.split(',') if args.only else list(SHAPES)
  rows = []
  other_name = 'im2col+dot' if args.against == 'xla' else 'native bf16'
  print(
    f'| row | x shape | kernel | native ms | native GFLOP/s | {other_name} ms '
    f'| {other_name} GFLOP/s | speed-up of {"native" if args.against == "xla" else "bf16"} |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for name in names:
    op, x_shape, k_shape = SHAPES[name]
    n, h, w, c = x_shape
    kh, kw, _, o = k_shape
    oh, ow = h - kh + 1, w - kw + 1
    flops = 2 * n * oh * ow * kh * kw * c * o
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape)
    if op == 'f':
      other = jax.random.normal(kk, k_shape)
      fast = jax.jit(native.conv)
      base = jax.jit(
        (lambda x, k: native.conv(x, k, bf16=True))
        if args.against == 'bf16'
        else lambda x, k: jnp.dot(
          im2col_patches(x, kh, kw).reshape(-1, kh * kw * c), k.reshape(-1, o)
        )
      )
    else:
      other = jax.random.normal(kk, (n, oh, ow, o))
      fast = jax.jit(lambda x, dy: native.conv_kernel_grad(x, dy, (kh, kw)))
      base = jax.jit(
        (lambda x, dy: native.conv_kernel_grad(x, dy, (kh, kw), bf16=True))
        if args.against == 'bf16'
        else lambda x, dy: jnp.dot(
          im2col_patches(x, kh, kw).reshape(-1, kh * kw * c).T, dy.reshape(-1, o)
        )
      )
    a, b = np.asarray(fast(x, other)).reshape(-1), np.asarray(base(x, other)).reshape(-1)
    if args.against == 'bf16':  # operands rounded to 8 significant bits
      assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(a), name
    else:
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)
    times = {'native': [], 'other': []}
    for _ in range(args.reps):
      for side, fn in (('native', fast), ('other', base)):
        for j in range(5):
          t = time.perf_counter()
          fn(x, other).block_until_ready()
          if j:
            times[side].append(time.perf_counter() - t)
    t_n, t_x = float(np.median(times['native'])), float(np.median(times['other']))
    rows.append(
      dict(
        row=name,
        op=op,
        x=x_shape,
        kernel=k_shape,
        native_ms=round(t_n * 1e3, 3),
        native_gflops=round(flops / t_n / 1e9, 1),
        **{f'{args.against}_ms': round(t_x * 1e3, 3)},
        **{f'{args.against}_gflops': round(flops / t_x / 1e9, 1)},
        # native over im2col + dot, or bfloat16 over float32 products
        speedup=round(t_x / t_n if args.against == 'xla' else t_n / t_x, 2),
      )
    )
    r = rows[-1]
    print(
      f'| {name} | {x_shape} | {k_shape} | {r["native_ms"]} | {r["native_gflops"]} | '
      f'{t_x * 1e3:.3f} | {flops / t_x / 1e9:.1f} | {r["speedup"]}x |',
      flush=True,
    )
  print(
    json.dumps(
      {
        'rows': rows,
        'against': args.against,
        'bf16_products': native.bf16_products(),
        'jax': jax.__version__,
        'cpu_count': os.cpu_count(),
      }
    )
  )


if __name__ == '__main__':
  main()
