"""CPU-friendly lowerings of SeedCNN's convolution and max-pool.

Why: on XLA:CPU the gradient of `nn.max_pool` lowers to select_and_scatter and the gradients of
`lax.conv_general_dilated` run far below the machine's matmul speed. The 'dot' lowering writes
the same maths with ops XLA:CPU is good at:

- convolution (stride 1, 'VALID') as im2col: the kh*kw shifted views are concatenated on the
  channel axis and multiplied by the reshaped kernel in ONE matmul (its gradients are matmuls too);
- 2x2 max-pool as crop-to-even + reshape + max over the window axes, whose gradient is a cheap
  elementwise mask.

The parameters are the same `nn.Conv` kernels in every lowering, so checkpoints are
interchangeable; 'xla' stays the straightforward path used on GPU/TPU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

LOWERINGS: tuple[str, ...] = ('auto', 'xla', 'dot')


def resolve_lowering(lowering: str) -> str:
  """Maps 'auto' to 'dot' on the CPU backend and to 'xla' elsewhere."""
  if lowering not in LOWERINGS:
    raise ValueError(f'unknown lowering {lowering!r}; expected one of {LOWERINGS}')
  if lowering == 'auto':
    return 'dot' if jax.default_backend() == 'cpu' else 'xla'
  return lowering


def max_pool_2x2(x: jax.Array, lowering: str = 'auto') -> jax.Array:
  """2x2 max-pool, stride 2, 'valid' padding on NHWC input.

  Odd sizes are floored like Keras MaxPool2D(padding='valid'):
  out = floor(n / 2), the last row/column is dropped.
  """
  if resolve_lowering(lowering) == 'xla':
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  b, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  x = x[:, :2 * ho, :2 * wo, :]
  return jnp.max(x.reshape(b, ho, 2, wo, 2, c), axis=(2, 4))


def _is_plain_valid(window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
  ones = lambda v: v is None or all(int(d) == 1 for d in v)
  no_pad = padding == 'VALID' or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
  return ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation) and no_pad and feature_group_count == 1


def im2col_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` (NHWC x HWIO, as nn.Conv calls it): one matmul.

  Only stride 1 / 'VALID' / undilated / ungrouped convolutions take the im2col path; anything
  else falls back to lax.conv_general_dilated.
  """
  if lhs.ndim != 4 or not _is_plain_valid(window_strides, padding, lhs_dilation, rhs_dilation,
                                          feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  b, h, w, c = lhs.shape
  kh, kw, _, o = rhs.shape
  ho, wo = h - kh + 1, w - kw + 1
  patches = jnp.concatenate([lhs[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
                            axis=-1)  # (B, Ho, Wo, kh*kw*C) in HWI order, matching rhs.reshape
  out = jnp.dot(patches.reshape(-1, kh * kw * c), rhs.reshape(kh * kw * c, o), precision=precision,
                preferred_element_type=preferred_element_type)
  return out.reshape(b, ho, wo, o)


def conv_fn(lowering: str):
  """The convolution function nn.Conv should use under `lowering`."""
  return im2col_conv if resolve_lowering(lowering) == 'dot' else lax.conv_general_dilated
