"""VGG for FER (Khaireddin & Chen 2021, "Facial Emotion Recognition: State of the Art
Performance on FER2013"): four blocks of two 3x3 'SAME' conv + BatchNorm + ReLU (64, 128, 256,
512 channels), each followed by a 2x2 max-pool, then Dense 4096 - Dense 4096 with dropout - the
logits, on 40x40 crops. 29,890,759 parameters at 40x40x1 and 7 classes.

`blocks` lists each block's conv channels (one 2x2 pool per block), `width` scales every conv
and dense width (0.5: 32 ... 256 channels) and `dense` sets the head, so the same file gives the
compact CPU variant of `experiments/cpu_budget.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models import layers

# Evaluation runs the dense head on at least this many rows under the CPU lowerings: XLA:CPU
# (jaxlib 0.10) fuses the head into one YNNPACK call that runs batches of 2-8 slower than 16
# (benchmarks/README.md). Training is left as is: padding would change dropout masks drawn
# without example ids.
HEAD_ROWS = 16


class VGGFer(nn.Module):
  """NHWC float (B, S, S, 1) -> (B, K) float32 logits.

  Attributes:
    num_classes: number of logits.
    blocks: conv channels of each block (two conv + BatchNorm + ReLU, then a 2x2 max-pool).
    width: multiplier of the conv channels and of the dense widths.
    dense: widths of the hidden dense layers (each ReLU, then dropout).
    dropout: rate after each hidden dense layer (the reference uses 0.2).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    lowering: conv/pool lowering, see `layers.resolve_lowering`.
    bn_axis_name: the pmap axis over which BatchNorm averages its batch statistics (set by the
      pmap driver so jit and pmap normalise over the same global batch).
    conv_precision: 'float32', or 'bfloat16': the convs' products of bfloat16-rounded
      operands, summed in float32, on the C++ kernels (`layers.CONV_PRECISIONS`).
  """

  num_classes: int = 7
  blocks: tuple[int, ...] = (64, 128, 256, 512)
  width: float = 1.0
  dense: tuple[int, ...] = (4096, 4096)
  dropout: float = 0.2
  dtype: Any = jnp.float32
  lowering: str = 'auto'
  bn_axis_name: str | None = None
  conv_precision: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, example_ids: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    for block, channels in enumerate(self.blocks):
      for j in 'ab':
        x = layers.ConvBNReLU(
          max(1, round(channels * self.width)),
          lowering=self.lowering,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          conv_precision=self.conv_precision,
          name=f'conv{block + 1}{j}',
        )(x, train)
      x = layers.max_pool(x, self.lowering)
    rows = x.shape[0]
    x = x.reshape(rows, -1)
    cpu = layers.resolve_lowering(self.lowering) != 'xla'
    if cpu and not train and isinstance(rows, int) and 1 < rows < HEAD_ROWS:  # (int: not symbolic)
      x = jnp.pad(x, ((0, HEAD_ROWS - rows), (0, 0)))
    for i, features in enumerate(self.dense):
      x = nn.Dense(max(1, round(features * self.width)), dtype=self.dtype, name=f'dense{i + 1}')(x)
      x = layers.Dropout(self.dropout, deterministic=not train, name=f'drop{i + 1}')(
        nn.relu(x), example_ids
      )
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)[:rows].astype(jnp.float32)
