"""SeedCNN: the reference project's Keras CNN, layer for layer, in Flax linen.

Keras original (input S x S x 1):
  Conv2D(32, 3, relu, valid) -> MaxPool2D(2) -> Dropout(.25)
  -> Conv2D(64, 3, relu, valid) -> MaxPool2D(2) -> Dropout(.25)
  -> Flatten -> Dense(128, relu, kernel_regularizer=l2) -> Dropout(.5)
  -> Dense(num_classes, softmax)
Here the last layer returns float32 logits; the softmax lives in the loss.

Parameter names are fixed (conv1, conv2, dense1, logits) and identical for
every pooling lowering and dtype, so checkpoints move freely between them.
The Keras L2 penalty applies to the Dense-128 kernel only, which lives at
params['dense1']['kernel'] (see `SeedCNN.L2_KERNEL_PATHS`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers


class SeedCNN(nn.Module):
  """The seed notebook's CNN; NHWC float input (B, S, S, 1) -> (B, K) logits.

  Attributes:
    num_classes: number of output logits.
    dropout: rates after pool 1, after pool 2 and after Dense-128.
    dtype: compute dtype (float32 or bfloat16); params stay float32 and the
      logits are returned as float32 either way.
    lowering: 'xla' (lax.conv + nn.max_pool), 'dot' (im2col matmul conv + reshape max-pool,
      much faster on XLA:CPU), 'native' (C++ direct conv kernels + reshape max-pool, faster
      still) or 'auto' (native on CPU, or dot where they cannot be built; xla elsewhere);
      see layers.py.
    conv_precision: as in `VGGFer`.
  """

  num_classes: int = 7
  dropout: tuple[float, float, float] = (0.25, 0.25, 0.5)
  dtype: Any = jnp.float32
  lowering: str = 'auto'
  conv_precision: str = 'float32'

  # Paths (inside variables['params']) of the kernels that get the Keras L2 penalty.
  L2_KERNEL_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (('dense1', 'kernel'),)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, example_ids: jax.Array | None = None) -> jax.Array:
    """`example_ids` (B,): per-example dropout streams that do not depend on batch layout."""
    p1, p2, p3 = self.dropout
    deterministic = not train
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    conv = dict(lowering=self.lowering, conv_precision=self.conv_precision, **kw)
    x = x.astype(self.dtype)
    x = layers.ConvReluPool(32, name='conv1', **conv)(x)
    x = layers.Dropout(p1, deterministic=deterministic, name='drop1')(x, example_ids)
    x = layers.ConvReluPool(64, name='conv2', **conv)(x)
    x = layers.Dropout(p2, deterministic=deterministic, name='drop2')(x, example_ids)
    x = x.reshape(x.shape[0], -1)  # Keras Flatten on NHWC: same (H, W, C) order.
    x = nn.relu(nn.Dense(128, name='dense1', **kw)(x))
    x = layers.Dropout(p3, deterministic=deterministic, name='drop3')(x, example_ids)
    x = nn.Dense(self.num_classes, name='logits', **kw)(x)
    return x.astype(jnp.float32)
