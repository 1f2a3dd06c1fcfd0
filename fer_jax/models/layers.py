"""Shared layer helpers: a 2x2 max-pool with a choice of XLA lowering.

Why two lowerings: the gradient of `nn.max_pool` lowers to XLA's
select_and_scatter, which XLA:CPU runs slowly. Writing the same pool as a
reshape plus a max over the 2x2 window axes gives a plain reduction whose
gradient is a cheap elementwise mask, so it is much faster on CPU. Both give
the same numbers (up to which of several *tied* maxima receives the
gradient), and neither owns parameters, so checkpoints are interchangeable.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LOWERINGS: tuple[str, ...] = ('auto', 'xla', 'reshape')


def resolve_lowering(lowering: str) -> str:
  """Maps 'auto' to 'reshape' on the CPU backend and to 'xla' elsewhere."""
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown pooling lowering {lowering!r}; expected one of {LOWERINGS}')
  if lowering == 'auto':
    return 'reshape' if jax.default_backend() == 'cpu' else 'xla'
  return lowering


def max_pool_2x2(x: jax.Array, lowering: str = 'auto') -> jax.Array:
  """2x2 max-pool, stride 2, 'valid' padding on NHWC input.

  Odd sizes are floored like Keras MaxPool2D(padding='valid'):
  out = floor(n / 2), the last row/column is dropped.
  """
  lowering = resolve_lowering(lowering)
  if lowering == 'xla':
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  b, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  x = x[:, :2 * ho, :2 * wo, :]
  return jnp.max(x.reshape(b, ho, 2, wo, 2, c), axis=(2, 4))
