"""Model registry: `get_model(config.model, num_classes)` builds a Flax module by name.

A model is one file in this package and one entry in `MODELS`: a builder
`(model_cfg, num_classes) -> nn.Module` that reads its own options from `model_cfg` (with
defaults) and rejects bad ones with a one-line ConfigError. The module is any `flax.linen`
Module called as `model.apply(variables, x, train=..., **optional)`:

- `x` is (B, S, S, 1) float, S = `model.image_size`; the output is (B, num_classes) float32
  logits.
- Collections other than 'params' that `init` returns (BatchNorm's 'batch_stats') are kept in
  the train state, updated in training (`mutable=`) and used in evaluation.
- A model whose `__call__` takes `example_ids` gets each example's global index, for dropout
  masks that do not depend on how the batch is split over devices (`layers.Dropout`).
- A model with BatchNorm takes `bn_axis_name`; the pmap driver sets it.
- Keras-style L2 (`config.train.l2`, scope 'model') penalises the kernels a model names in a
  `L2_KERNEL_PATHS` class variable (SeedCNN: its Dense-128); scope 'all' takes every kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax import native
from fer_jax.errors import ConfigError
from fer_jax.models import layers
from fer_jax.models.resnet import ResNet
from fer_jax.models.seed_cnn import SeedCNN
from fer_jax.models.vgg_fer import VGGFer

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _dtype(model_cfg: Any) -> Any:
  name = model_cfg.get('dtype', 'float32')
  if name not in DTYPES:
    raise ConfigError(f'config.model.dtype={name!r}: expected one of {sorted(DTYPES)}')
  return DTYPES[name]


def _lowering(model_cfg: Any) -> str:
  name = model_cfg.get('lowering', 'auto')
  if name not in layers.LOWERINGS:
    raise ConfigError(f'config.model.lowering={name!r}: expected one of {list(layers.LOWERINGS)}')
  if name in ('auto', 'native') and layers.backend() == 'cpu':
    # Build (once per machine) and load the C++ kernels here, at model construction, rather
    # than while the first step is being traced.
    native.available()
  if name == 'native' and layers.backend() == 'cpu' and not native.available():
    raise ConfigError(
      f"config.model.lowering='native' needs the C++ conv kernels, which are not "
      f"available here: {native.unavailable_reason()} (use 'auto' or 'dot')"
    )
  return name


def _conv_precision(model_cfg: Any) -> str:
  name = model_cfg.get('conv_precision', 'float32')
  if name not in layers.CONV_PRECISIONS:
    raise ConfigError(
      f'config.model.conv_precision={name!r}: expected one of {list(layers.CONV_PRECISIONS)}'
    )
  if name == 'bfloat16':
    layers.notice_conv_precision(model_cfg.get('lowering', 'auto'))
  return name


def _rate(value: Any, what: str) -> float:
  try:
    rate = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f'config.model.{what}={value!r}: expected a rate in [0, 1)') from None
  if not 0.0 <= rate < 1.0:
    raise ConfigError(f'config.model.{what}={value!r}: expected a rate in [0, 1)')
  return rate


def _min_size(model_cfg: Any, minimum: int, name: str) -> None:
  size = int(model_cfg.get('image_size', 48))
  if size < minimum:
    raise ConfigError(f'config.model.image_size={size}: {name} needs at least {minimum}')


def _seed_cnn(model_cfg: Any, num_classes: int) -> nn.Module:
  rates = model_cfg.get('dropout', (0.25, 0.25, 0.5))
  if isinstance(rates, (int, float)) or len(tuple(rates)) != 3:
    raise ConfigError(f'config.model.dropout={rates!r}: seed_cnn expects 3 rates in [0, 1)')
  _min_size(model_cfg, 12, 'seed_cnn')
  return SeedCNN(
    num_classes=num_classes,
    dropout=tuple(_rate(r, 'dropout') for r in rates),
    dtype=_dtype(model_cfg),
    lowering=_lowering(model_cfg),
    conv_precision=_conv_precision(model_cfg),
  )


def _vgg_fer(model_cfg: Any, num_classes: int) -> nn.Module:
  width = float(model_cfg.get('width', 1.0))
  dense = tuple(int(d) for d in model_cfg.get('dense', (4096, 4096)))
  blocks = tuple(int(c) for c in model_cfg.get('blocks', (64, 128, 256, 512)))
  if not width > 0 or any(d <= 0 for d in dense):
    raise ConfigError(f'config.model.width={width} and dense={dense} must be positive')
  if not blocks or any(c <= 0 for c in blocks):
    raise ConfigError(f'config.model.blocks={blocks}: expected one or more positive channel counts')
  _min_size(model_cfg, 2 ** len(blocks), f'vgg_fer ({len(blocks)} 2x2 pools)')
  return VGGFer(
    num_classes=num_classes,
    blocks=blocks,
    width=width,
    dense=dense,
    dropout=_rate(model_cfg.get('dropout', 0.2), 'dropout'),
    dtype=_dtype(model_cfg),
    lowering=_lowering(model_cfg),
    conv_precision=_conv_precision(model_cfg),
  )


def _resnet18(model_cfg: Any, num_classes: int) -> nn.Module:
  width = int(model_cfg.get('width', 64))
  if width <= 0:
    raise ConfigError(f'config.model.width={width}: must be a positive channel count')
  _min_size(model_cfg, 8, 'resnet18 (three stride-2 stages)')
  return ResNet(
    num_classes=num_classes,
    stage_sizes=(2, 2, 2, 2),
    width=width,
    dropout=_rate(model_cfg.get('dropout', 0.0), 'dropout'),
    dtype=_dtype(model_cfg),
    lowering=_lowering(model_cfg),
    conv_precision=_conv_precision(model_cfg),
  )


MODELS: dict[str, Callable[[Any, int], nn.Module]] = {
  'seed_cnn': _seed_cnn,
  'vgg_fer': _vgg_fer,
  'resnet18': _resnet18,
}


def get_model(model_cfg: Any, num_classes: int) -> nn.Module:
  """Builds the module named by `model_cfg.name` (a ConfigDict or dict)."""
  name = model_cfg.get('name')
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r} is unknown; known models: {sorted(MODELS)}')
  return MODELS[name](model_cfg, num_classes)


def for_pmap(model: nn.Module, axis_name: str) -> nn.Module:
  """The model with its BatchNorm statistics taken over the pmap axis (if it has BatchNorm)."""
  return model.clone(bn_axis_name=axis_name) if hasattr(model, 'bn_axis_name') else model


def count_params(params: Any) -> int:
  """Total number of scalar parameters in a pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def l2_kernels(model: nn.Module, params: Any) -> list[jax.Array]:
  """The kernels a model names for the Keras-style L2 penalty (`L2_KERNEL_PATHS`; none if unset)."""
  out = []
  for path in getattr(type(model), 'L2_KERNEL_PATHS', ()):
    tree = params
    for key in path:
      tree = tree[key]
    out.append(tree)
  return out


__all__ = [
  'DTYPES',
  'MODELS',
  'ResNet',
  'SeedCNN',
  'VGGFer',
  'count_params',
  'for_pmap',
  'get_model',
  'l2_kernels',
]
