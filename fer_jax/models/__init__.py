"""Model registry: `get_model(c.model, num_classes)` builds a Flax module by name.

A new model slots in by adding a builder `(model_cfg, num_classes) -> nn.Module`
to `MODELS`. Every model class declares `L2_KERNEL_PATHS` (a ClassVar of key
paths inside variables['params']) so the loss finds the kernels that take the
Keras-style L2 penalty without knowing the architecture: `l2_kernels(model, params)`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax import native
from fer_jax.errors import ConfigError
from fer_jax.models import layers
from fer_jax.models.seed_cnn import SeedCNN

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _parse_dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ConfigError(f'model.dtype={name!r} is not supported; use one of {sorted(_DTYPES)}')
  return _DTYPES[name]


def _parse_lowering(name: str) -> str:
  if name not in layers.LOWERINGS:
    raise ConfigError(f'model.lowering={name!r} is not supported; use one of {list(layers.LOWERINGS)}')
  if name == 'native' and not native.available():
    raise ConfigError(f"model.lowering='native' needs the C++ conv kernels, which are not "
                      f"available here: {native.unavailable_reason()} (use 'auto' or 'dot')")
  return name


def _parse_dropout(rates: Any, n: int) -> tuple[float, ...]:
  try:
    rates = tuple(float(r) for r in rates)
  except (TypeError, ValueError):
    raise ConfigError(f'model.dropout must be a sequence of {n} rates, got {rates!r}') from None
  if len(rates) != n or not all(0.0 <= r < 1.0 for r in rates):
    raise ConfigError(f'model.dropout must be {n} rates in [0, 1), got {rates!r}')
  return rates


def _seed_cnn(model_cfg: Any, num_classes: int) -> nn.Module:
  return SeedCNN(
      num_classes=num_classes,
      dropout=_parse_dropout(model_cfg.get('dropout', (0.25, 0.25, 0.5)), 3),
      dtype=_parse_dtype(model_cfg.get('dtype', 'float32')),
      lowering=_parse_lowering(model_cfg.get('lowering', 'auto')))


MODELS: dict[str, Callable[[Any, int], nn.Module]] = {
    'seed_cnn': _seed_cnn,
}


def get_model(model_cfg: Any, num_classes: int) -> nn.Module:
  """Builds the module named by `model_cfg.name` (a ConfigDict or dict)."""
  name = model_cfg.get('name')
  if name not in MODELS:
    raise ConfigError(f'model.name={name!r} is unknown; known models: {sorted(MODELS)}')
  return MODELS[name](model_cfg, num_classes)


def count_params(params: Any) -> int:
  """Total number of scalar parameters in a pytree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def l2_kernels(model: nn.Module, params: Any) -> list[jax.Array]:
  """The kernels that take the Keras-style L2 penalty: `type(model).L2_KERNEL_PATHS` in params."""
  out = []
  for path in type(model).L2_KERNEL_PATHS:
    tree = params
    for key in path:
      tree = tree[key]
    out.append(tree)
  return out


__all__ = ['MODELS', 'SeedCNN', 'count_params', 'get_model', 'l2_kernels']
