"""The train and eval steps: one function each, driven by jax.jit (mesh) or jax.pmap.

Randomness is per example: each example's augmentation and dropout keys are
fold_in(fold_in(seed_key, step), global_index_in_batch). The numbers therefore do not depend
on how the global batch is split over devices or hosts, which is what lets jit and pmap (and
1 host x 4 devices vs 2 hosts x 2 devices) agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from fer_jax import augment
from fer_jax.errors import ConfigError
from fer_jax.models import l2_kernels

TrainState = train_state.TrainState


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything the steps close over: static model/config plus small constant arrays."""
  model: nn.Module
  augment_cfg: ml_collections.ConfigDict
  image_size: int
  num_classes: int
  class_weights: jax.Array  # (K,) float32
  l2: float
  label_smoothing: float
  mean: float
  std: float
  seed: int


def make_optimizer(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """adamw with the configured schedule; decoupled weight decay on kernels only."""
  total = max(int(train_cfg.epochs * steps_per_epoch), 1)
  warmup = min(int(train_cfg.warmup_epochs * steps_per_epoch), total - 1)
  if train_cfg.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, train_cfg.learning_rate, max(warmup, 1) if warmup else 1,
                                            total, end_value=0.0)
  elif train_cfg.schedule == 'constant':
    lr = train_cfg.learning_rate
  else:
    raise ConfigError(f"config.train.schedule={train_cfg.schedule!r}: expected 'constant' or 'cosine'")
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)
  return optax.adamw(lr, weight_decay=train_cfg.weight_decay, mask=decay_mask)


def create_train_state(ctx: StepContext, tx: optax.GradientTransformation) -> TrainState:
  dummy = jnp.zeros((1, ctx.image_size, ctx.image_size, 1), jnp.float32)
  params = ctx.model.init(jax.random.key(ctx.seed), dummy, train=False)['params']
  return TrainState.create(apply_fn=ctx.model.apply, params=params, tx=tx)


def _example_keys(ctx: StepContext, step: jax.Array, batch_size: int, axis_name: str | None):
  """Per-example (augment, dropout) keys from the example's global position in the batch."""
  offset = jax.lax.axis_index(axis_name) * batch_size if axis_name else 0
  step_key = jax.random.fold_in(jax.random.key(ctx.seed + 1), step)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(batch_size))
  pair = jax.vmap(jax.random.split)(keys)
  return pair[:, 0], pair[:, 1]


def l2_penalty(model: nn.Module, params: Any) -> jax.Array:
  """Keras `kernel_regularizer=l2(lam)` adds lam * sum(W**2) of the regularised kernels."""
  return sum(jnp.sum(jnp.square(k)) for k in l2_kernels(model, params))


def train_step(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a uint8 batch: augment on device, weighted CE + L2, adamw."""
  images, labels = batch['image'], batch['label']
  aug_keys, drop_keys = _example_keys(ctx, state.step, images.shape[0], axis_name)
  x = augment.preprocess_batch(images, aug_keys, ctx.augment_cfg, out_size=ctx.image_size,
                               train=True, mean=ctx.mean, std=ctx.std)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, ctx.num_classes), ctx.label_smoothing)
  weights = ctx.class_weights[labels]

  def loss_fn(params):
    def one(xi, key):
      return state.apply_fn({'params': params}, xi[None], train=True, rngs={'dropout': key})[0]
    logits = jax.vmap(one)(x, drop_keys)
    # Keras class_weight: per-example weight, mean over the batch size (not over the weights).
    data_loss = jnp.mean(weights * optax.softmax_cross_entropy(logits, targets))
    return data_loss + ctx.l2 * l2_penalty(ctx.model, params), (data_loss, logits)

  (loss, (data_loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'data_loss': data_loss,
             'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], ctx: StepContext,
              axis_name: str | None = None) -> dict[str, jax.Array]:
  """Sums over the (masked) batch: loss, and the confusion matrix (rows true, cols predicted)."""
  x = augment.preprocess_batch(batch['image'], None, ctx.augment_cfg, out_size=ctx.image_size,
                               train=False, mean=ctx.mean, std=ctx.std)
  logits = ctx.model.apply({'params': params}, x, train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  true = jax.nn.one_hot(batch['label'], ctx.num_classes) * mask[:, None]
  pred = jax.nn.one_hot(jnp.argmax(logits, -1), ctx.num_classes)
  out = {'loss_sum': jnp.sum(ce * mask), 'count': jnp.sum(mask),
         'confusion': jnp.einsum('bi,bj->ij', true, pred)}
  if axis_name:
    out = jax.lax.psum(out, axis_name)
  return out
