"""ResNet-18 with a CIFAR-style stem (a 3x3 stride-1 conv, no stem pooling) for 40-48 px faces:
11,171,271 parameters at 1 channel and 7 classes.

The layout is flax/examples/imagenet's ResNet (BasicBlock, projection shortcut = 1x1 conv +
BatchNorm where the shape changes), with the small-image stem of the CIFAR ResNets.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers


class BasicBlock(nn.Module):
  features: int
  strides: int
  lowering: str
  dtype: Any
  bn_axis_name: str | None
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(
      lowering=self.lowering,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      conv_precision=self.conv_precision,
    )
    y = layers.ConvBNReLU(self.features, strides=self.strides, use_bias=False, name='conv1', **kw)(
      x, train
    )
    y = layers.ConvBNReLU(
      self.features, use_bias=False, relu=False, zero_init_scale=True, name='conv2', **kw
    )(y, train)
    if x.shape[-1] != self.features or self.strides != 1:
      x = layers.ConvBNReLU(
        self.features,
        kernel_size=1,
        strides=self.strides,
        use_bias=False,
        relu=False,
        name='shortcut',
        **kw,
      )(x, train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """NHWC float (B, S, S, 1) -> (B, K) float32 logits.

  Attributes:
    num_classes: number of logits.
    stage_sizes: BasicBlocks per stage ((2, 2, 2, 2) is ResNet-18).
    width: channels of the first stage (doubling at each of the next three).
    dropout: rate before the logits (0: none).
    dtype, lowering, bn_axis_name, conv_precision: as in `VGGFer`.
  """

  num_classes: int = 7
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  width: int = 64
  dropout: float = 0.0
  dtype: Any = jnp.float32
  lowering: str = 'auto'
  bn_axis_name: str | None = None
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, example_ids: jax.Array | None = None) -> jax.Array:
    kw = dict(
      lowering=self.lowering,
      dtype=self.dtype,
      bn_axis_name=self.bn_axis_name,
      conv_precision=self.conv_precision,
    )
    x = layers.ConvBNReLU(self.width, use_bias=False, name='stem', **kw)(
      x.astype(self.dtype), train
    )
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = BasicBlock(
          self.width * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          name=f'stage{i + 1}_block{j + 1}',
          **kw,
        )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Dropout(self.dropout, deterministic=not train, name='drop')(x, example_ids)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x).astype(jnp.float32)
